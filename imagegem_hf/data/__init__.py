"""The ImageGem dataset: schemas, the raw Civitai → Hub builder, recommendation subsets, pairs, statistics."""
