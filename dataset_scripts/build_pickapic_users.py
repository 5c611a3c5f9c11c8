"""Build the per-user preference dataset of paper 003 from Pick-a-Pic-v2-style records (Hub-shaped folder).

Same as `imagegem preference build`; kept as a script so that the dataset repo can show how it was made:

    python dataset_scripts/build_pickapic_users.py --records pickapic_v2.parquet --image-bytes-columns jpg_0,jpg_1 \
        --output-dir pickapic-users/
    python dataset_scripts/build_pickapic_users.py --synthetic-users 40 --output-dir synthetic-users/ \
        --val-users 2 --test-users 6 --seen-users 4

The records need `user_id, image_0, image_1, label_0, caption` (rename Pick-a-Pic's `image_0_uid`/`image_1_uid`);
ties are dropped, users with at least 11 unique liked images are kept, splits and references are drawn by image, and
missing or undecodable images are quarantined (counted in the output and the card). The records file is streamed and
the output is sharded parquet (`pairs/<split>-XXXXX-of-YYYYY.parquet`, `images/images-XXXXX-of-YYYYY.parquet`), so
memory does not grow with the number of pairs. Publish the folder with
`huggingface-cli upload <repo> pickapic-users/ --repo-type dataset`.
"""

import argparse
import sys

from imagegem_hf.preference.cli import register


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="build_pickapic_users.py")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["preference", "build", *argv])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
