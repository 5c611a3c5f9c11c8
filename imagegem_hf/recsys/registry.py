"""`MODELS`: every recommender class by its `name` (what `Recommender.from_pretrained` reads from `config.json`)."""

from __future__ import annotations

from imagegem_hf.recsys.base import Recommender
from imagegem_hf.recsys.item2vec import Item2Vec
from imagegem_hf.recsys.knn import ItemKNN, Pop, UserKNN
from imagegem_hf.recsys.sasrec import SASRec
from imagegem_hf.recsys.two_tower import TwoTower

MODELS: dict[str, type[Recommender]] = {cls.name: cls for cls in (Pop, ItemKNN, UserKNN, Item2Vec, TwoTower, SASRec)}
