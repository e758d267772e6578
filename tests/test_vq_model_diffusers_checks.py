"""diffusers' generic model checks, run on GroupVQVAE."""

import json
import warnings

import pytest
import torch
from conftest import VQ_TEST_INIT, dummy_inputs
from diffusers import VQModel
from diffusers.training_utils import EMAModel

from groupvq_hf import GroupVQVAE


# --------------------------------------------------------------------------------------------- diffusers' generic
# The checks of diffusers' ModelTesterMixin / TrainingTesterMixin / NewAutoencoderTesterMixin that run on a CPU,
# with diffusers' own VQModel test configuration and inputs.
class TestDiffusersGenericModelChecks:
    @torch.no_grad()
    def test_from_save_pretrained(self, tmp_path):
        torch.manual_seed(0)
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        model.save_pretrained(tmp_path)
        new_model = GroupVQVAE.from_pretrained(tmp_path)
        for name, value in model.state_dict().items():
            assert new_model.state_dict()[name].shape == value.shape
        image = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(image, new_model(**dummy_inputs(), return_dict=False)[0], atol=5e-5, rtol=5e-5)

    @torch.no_grad()
    def test_from_save_pretrained_variant(self, tmp_path):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        model.save_pretrained(tmp_path, variant="fp16")
        new_model = GroupVQVAE.from_pretrained(tmp_path, variant="fp16")
        with pytest.raises(OSError, match="Error no file named diffusion_pytorch_model.bin found in directory"):
            GroupVQVAE.from_pretrained(tmp_path)
        image = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(image, new_model(**dummy_inputs(), return_dict=False)[0], atol=5e-5, rtol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_from_save_pretrained_dtype(self, tmp_path, dtype):
        model = GroupVQVAE(**VQ_TEST_INIT).eval().to(dtype)
        model.save_pretrained(tmp_path)
        assert GroupVQVAE.from_pretrained(tmp_path, low_cpu_mem_usage=True, torch_dtype=dtype).dtype == dtype
        # as diffusers' own check: a model with `_keep_in_fp32_modules` always loads with low_cpu_mem_usage=True
        with pytest.raises(ValueError, match="`low_cpu_mem_usage` cannot be False"):
            GroupVQVAE.from_pretrained(tmp_path, low_cpu_mem_usage=False, torch_dtype=dtype)

    @torch.no_grad()
    def test_determinism_and_output_shape(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        first = model(**dummy_inputs(), return_dict=False)[0]
        second = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(first, second, atol=1e-5, rtol=0)
        assert first[0].shape == (3, 32, 32)

    @torch.no_grad()
    def test_outputs_equivalence(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        as_dict = model(**dummy_inputs())
        as_tuple = model(**dummy_inputs(), return_dict=False)
        assert len(as_tuple) == len(as_dict.values()) == 2
        for a, b in zip(as_tuple, as_dict.values()):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)

    def test_getattr_is_correct(self):
        model = GroupVQVAE(**VQ_TEST_INIT)
        model.dummy_attribute = 5
        model.register_to_config(test_attribute=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert model.dummy_attribute == 5 and model.save_pretrained == getattr(model, "save_pretrained")
        with pytest.warns(FutureWarning):
            assert model.test_attribute == 5
        with pytest.raises(AttributeError) as error:
            model.does_not_exist
        assert str(error.value) == "'GroupVQVAE' object has no attribute 'does_not_exist'"

    @torch.no_grad()
    def test_sharded_checkpoints_with_parallel_loading(self, tmp_path):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, constants

        torch.manual_seed(0)
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        base = model(**dummy_inputs(), return_dict=False)[0]
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(tmp_path, max_shard_size=f"{int(size * 0.75 / 1024)}KB")
        index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert any(name.startswith("quantize.") for name in index["weight_map"])
        original = constants.HF_ENABLE_PARALLEL_LOADING
        try:
            for parallel in (False, True):
                constants.HF_ENABLE_PARALLEL_LOADING = parallel
                loaded = GroupVQVAE.from_pretrained(tmp_path).eval()
                assert torch.allclose(base, loaded(**dummy_inputs(), return_dict=False)[0], atol=1e-5, rtol=0)
        finally:
            constants.HF_ENABLE_PARALLEL_LOADING = original

    def test_training_step_with_ema(self):
        model = GroupVQVAE(**VQ_TEST_INIT).train()
        ema = EMAModel(model.parameters())
        output = model(**dummy_inputs(), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(output, torch.randn_like(output)) + model(**dummy_inputs()).commit_loss
        loss.backward()
        ema.step(model.parameters())
        assert model.quantize.bias.grad is not None and model.encoder.conv_in.weight.grad is not None
        assert not model._supports_gradient_checkpointing  # as VQModel: the gradient-checkpointing tests skip

    @torch.no_grad()
    def test_forward_with_norm_groups(self):
        model = GroupVQVAE(**{**VQ_TEST_INIT, "norm_num_groups": 16, "block_out_channels": (16, 32)}).eval()
        output = model(**dummy_inputs()).to_tuple()[0]
        assert output.shape == dummy_inputs()["sample"].shape

    @torch.no_grad()
    def test_layerwise_casting_keeps_quantizer_in_compute_dtype(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        reference = model(**dummy_inputs()).sample
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        assert model.quantize.bias.dtype == torch.float32 and model.encoder.conv_in.weight.dtype == torch.bfloat16
        output = model(**dummy_inputs()).sample
        assert output.shape == reference.shape and output.dtype == torch.float32 and output.isfinite().all()

    def test_offloading_support_flags_match_vqmodel(self):
        # diffusers' offloading tests skip a model without `_no_split_modules` / group-offload support, as VQModel.
        assert GroupVQVAE._no_split_modules == VQModel._no_split_modules
        assert GroupVQVAE._supports_group_offloading == VQModel._supports_group_offloading
        assert GroupVQVAE._skip_layerwise_casting_patterns == VQModel._skip_layerwise_casting_patterns
