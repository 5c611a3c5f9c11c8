"""Fill the `preference_pairs` config of a built ImageGem dataset (and optionally write the exchange format).

Same as `imagegem dataset pairs`; kept as a script so that the dataset repo can show how its pairs were made:

    python dataset_scripts/make_preference_pairs.py imagegem/ --score hpsv2 --image-dir pixels/ --device cuda \
        --exchange-dir imagegem-dpo-pairs/
"""

import sys

from imagegem_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "pairs", *sys.argv[1:]]))
