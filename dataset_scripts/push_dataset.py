"""Upload a built dataset folder (parquet configs + card) to the Hub.

Same as `imagegem dataset push`; kept as a script so that the dataset repo can show how it was made:

    python dataset_scripts/push_dataset.py imagegem/ org/imagegem
"""

import sys

from imagegem_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "push", *sys.argv[1:]]))
