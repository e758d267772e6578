#!/usr/bin/env python
"""The paper's trends at CPU scale on the demo photos: usage over training for k = 1, 8, 32, n, final metrics on
held-out crops, the resize curve of the k = 8 model, and the old initialisation as a "before" column.

    python scripts/reproduce_trends.py --output_dir outputs/trends      # about 30 minutes on 2 CPU cores

See `groupvq_hf.trends` for what each run does; results land in OUTPUT_DIR/RESULTS.md, results.json and PNG plots.
"""

from groupvq_hf.trends import main

if __name__ == "__main__":
    main()
