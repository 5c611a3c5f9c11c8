"""Build the ImageGem configs (images, loras, interactions) from raw Civitai dumps into a Hub-shaped folder.

Same as `imagegem dataset build`; kept as a script so that the dataset repo can show how it was made:

    python dataset_scripts/build_imagegem.py raw/ imagegem/
"""

import sys

from imagegem_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "build", *sys.argv[1:]]))
