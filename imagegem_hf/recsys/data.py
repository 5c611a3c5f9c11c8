"""Interaction tables for recommendation: ids mapped to contiguous indices, duplicates handled explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from imagegem_hf.data.subsets import filter_min_interactions, leave_one_last_split


@dataclass
class InteractionData:
    """User–item interactions with contiguous indices and the original ids kept for output.

    Attributes:
        user_index: Index of the user of each interaction, shape (n,).
        item_index: Index of the item of each interaction, shape (n,).
        timestamp: Sortable time of each interaction (int64 nanoseconds or the original numbers), shape (n,).
        user_ids: Original user id of each index.
        item_ids: Original item id of each index.
    """

    user_index: np.ndarray
    item_index: np.ndarray
    timestamp: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user_index)

    @classmethod
    def from_table(
        cls,
        table: Any,
        user_col: str = "userHash",
        item_col: str = "itemId",
        time_col: str = "timestamp",
        item_type: str | None = None,
        config: str = "interactions",
        duplicates: str = "keep_last",
    ) -> InteractionData:
        """Read interactions from a pandas/pyarrow table, a parquet/CSV path, a `datasets.Dataset`, or a dataset
        folder / Hub repo id (its `config`).

        Args:
            table: The source.
            user_col: User id column.
            item_col: Item id column.
            time_col: Timestamp column (datetimes, numbers, or ISO strings).
            item_type: Keep only rows with this `itemType` ("image" or "model"; ImageGem's interactions).
            config: Config to read when `table` is a dataset folder or repo id.
            duplicates: `"keep_last"` keeps the last (user, item) event, `"keep_all"` keeps every event.

        Returns:
            The interactions, sorted by (user, time, original order).

        Raises:
            ValueError: Missing columns, empty table, null ids, or unparseable timestamps.

        Example:
            ```python
            >>> import pandas as pd
            >>> from imagegem_hf.recsys import InteractionData
            >>> df = pd.DataFrame({"userHash": ["a", "a", "b"], "itemId": [1, 2, 1], "timestamp": [1, 2, 3]})
            >>> InteractionData.from_table(df).n_items
            2
            ```
        """
        df = _to_pandas(table, config)
        missing = [c for c in (user_col, item_col, time_col) if c not in df.columns]
        if missing:
            raise ValueError(
                f"Missing column(s) {missing}; available: {list(df.columns)}. Pass user_col/item_col/"
                "time_col to name yours."
            )
        if item_type is not None:
            if "itemType" not in df.columns:
                raise ValueError("item_type was given but the table has no 'itemType' column.")
            df = df[df["itemType"] == item_type]
        if df.empty:
            raise ValueError("The interaction table is empty (after the item_type filter, if any).")
        if df[[user_col, item_col]].isna().any().any():
            raise ValueError(
                f"{int(df[[user_col, item_col]].isna().any(axis=1).sum())} row(s) have a null user or "
                "item id; drop or fill them first."
            )
        for col in (user_col, item_col):
            kinds = {type(v) for v in df[col].head(10_000)}
            if len(kinds) > 1 and str in kinds:
                raise ValueError(
                    f"Column {col!r} mixes strings and numbers ({sorted(k.__name__ for k in kinds)}); "
                    "cast it to one type first."
                )
        df = df.reset_index(drop=True)
        df = df.assign(_t=_timestamps(df[time_col]), _row=np.arange(len(df)))
        if duplicates == "keep_last":
            df = df.sort_values(["_t", "_row"], kind="stable").drop_duplicates([user_col, item_col], keep="last")
        elif duplicates != "keep_all":
            raise ValueError(f"duplicates must be 'keep_last' or 'keep_all', got {duplicates!r}.")
        user_codes, user_ids = pd.factorize(df[user_col], sort=True)
        item_codes, item_ids = pd.factorize(df[item_col], sort=True)
        order = np.lexsort((df["_row"].to_numpy(), df["_t"].to_numpy(), user_codes))
        return cls(
            user_index=user_codes[order].astype(np.int64),
            item_index=item_codes[order].astype(np.int64),
            timestamp=df["_t"].to_numpy()[order],
            user_ids=np.asarray(user_ids),
            item_ids=np.asarray(item_ids),
        )

    def subset(self, mask: np.ndarray) -> InteractionData:
        """The interactions where `mask` holds, with the same id vocabularies."""
        return InteractionData(
            self.user_index[mask], self.item_index[mask], self.timestamp[mask], self.user_ids, self.item_ids
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"user": self.user_index, "item": self.item_index, "t": self.timestamp})

    def filter_users(self, min_interactions: int = 3) -> InteractionData:
        """Keep users with at least `min_interactions` interactions (vocabularies are rebuilt)."""
        df = filter_min_interactions(self.to_frame(), min_interactions, user_col="user")
        if df.empty:
            raise ValueError(f"No user has ≥ {min_interactions} interactions.")
        users, user_codes = np.unique(df["user"].to_numpy(), return_inverse=True)
        items, item_codes = np.unique(df["item"].to_numpy(), return_inverse=True)
        return InteractionData(
            user_codes.astype(np.int64),
            item_codes.astype(np.int64),
            df["t"].to_numpy(),
            self.user_ids[users],
            self.item_ids[items],
        )

    def leave_one_last(self) -> tuple[InteractionData, InteractionData, InteractionData]:
        """`(train, validation, test)` by `imagegem_hf.data.subsets.leave_one_last_split` (stable time order)."""
        train, val, test = leave_one_last_split(self.to_frame().assign(_i=np.arange(len(self))), "user", "item", "t")
        return tuple(self.subset(np.sort(part["_i"].to_numpy())) for part in (train, val, test))

    def csr(self) -> sp.csr_matrix:
        """Binary user × item matrix (float32)."""
        data = np.ones(len(self), dtype=np.float32)
        matrix = sp.csr_matrix((data, (self.user_index, self.item_index)), shape=(self.n_users, self.n_items))
        matrix.data[:] = 1.0  # repeated events count once
        return matrix

    def sequences(self) -> list[np.ndarray]:
        """Item indices per user in time order (interactions are stored sorted by user, time)."""
        bounds = np.searchsorted(self.user_index, np.arange(self.n_users + 1))
        return [self.item_index[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]


def _timestamps(column: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(column):
        return column.astype("int64").to_numpy()
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy()
    try:
        return pd.to_datetime(column, utc=True, format="ISO8601").astype("int64").to_numpy()
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"Timestamps of column {column.name!r} are neither numbers nor ISO-8601 strings: {err}"
        ) from err


def _to_pandas(table: Any, config: str) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):  # pyarrow.Table, datasets.Dataset
        return table.to_pandas()
    path = Path(table) if isinstance(table, str | os.PathLike) else None
    if path is not None and path.is_file():
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        raise ValueError(f"Unsupported file type {path.suffix!r}; use .parquet or .csv.")
    if path is not None:
        from imagegem_hf.hub import resolve

        folder = resolve(table, repo_type="dataset")
        if (folder / config).is_dir():
            return pd.read_parquet(folder / config)
        if folder.is_dir() and any(folder.glob("*.parquet")):
            return pd.read_parquet(folder)
        raise FileNotFoundError(f"{folder} has no {config!r} config folder of parquet files.")
    raise ValueError(f"Cannot read interactions from a {type(table).__name__}.")
