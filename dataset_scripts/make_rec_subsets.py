"""Write the recommendation subsets (image / model, leave-one-last ready) of a built dataset.

Same as `imagegem dataset subsets`; kept as a script so that the dataset repo can show how it was made:

    python dataset_scripts/make_rec_subsets.py imagegem/ rec_subsets/
"""

import sys

from imagegem_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "subsets", *sys.argv[1:]]))
