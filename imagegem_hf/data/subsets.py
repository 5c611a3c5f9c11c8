"""Recommendation subsets (ImageGem Table 3) and the leave-one-last split.

Tie-break, documented once: a user's interactions are ordered by timestamp with a *stable* sort, so events with
equal timestamps keep their original row order; the last one is the test item, the one before it validation.
"""

from __future__ import annotations

import pandas as pd


def filter_min_interactions(df: pd.DataFrame, min_count: int = 3, user_col: str = "userHash") -> pd.DataFrame:
    """Drop users with fewer than `min_count` interactions (row order is kept).

    Example:
        ```python
        >>> import pandas as pd
        >>> df = pd.DataFrame({"userHash": ["a", "a", "a", "b"], "itemId": [1, 2, 3, 1]})
        >>> filter_min_interactions(df)["userHash"].unique().tolist()
        ['a']
        ```
    """
    counts = df.groupby(user_col, sort=False)[user_col].transform("size")
    return df[counts >= min_count]


def leave_one_last_split(
    df: pd.DataFrame, user_col: str = "userHash", item_col: str = "itemId", time_col: str = "timestamp"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split per user: last interaction → test, second to last → validation, the rest → train.

    Interactions are ordered by `(time_col, original row order)` with a stable sort.

    Args:
        df: Interactions, one row per event.
        user_col: User id column.
        item_col: Item id column (checked for nulls).
        time_col: Timestamp column (any sortable type).

    Returns:
        `(train, validation, test)` DataFrames with the original columns, each in time order per user.

    Raises:
        ValueError: A column is missing, ids are null, or some user has fewer than 3 interactions (filter first
            with `filter_min_interactions`).

    Example:
        ```python
        >>> import pandas as pd
        >>> df = pd.DataFrame({"userHash": ["u"] * 4, "itemId": [1, 2, 3, 4], "timestamp": [0, 1, 1, 2]})
        >>> train, val, test = leave_one_last_split(df)
        >>> train.itemId.tolist(), val.itemId.tolist(), test.itemId.tolist()
        ([1, 2], [3], [4])
        ```
    """
    missing = [c for c in (user_col, item_col, time_col) if c not in df.columns]
    if missing:
        raise ValueError(f"Missing column(s) {missing}; the table has {list(df.columns)}.")
    if df[[user_col, item_col]].isna().any().any():
        raise ValueError(f"Null values in {user_col!r} or {item_col!r}; drop or fill them before splitting.")
    ordered = df.reset_index(drop=True)
    ordered = ordered.assign(_row=range(len(ordered))).sort_values([user_col, time_col, "_row"], kind="stable")
    counts = ordered.groupby(user_col, sort=False)[user_col].transform("size")
    too_few = ordered.loc[counts < 3, user_col].nunique()
    if too_few:
        raise ValueError(
            f"{too_few} user(s) have fewer than 3 interactions; leave-one-last needs ≥ 3. "
            "Call filter_min_interactions(df, 3) first."
        )
    from_end = ordered.groupby(user_col, sort=False).cumcount(ascending=False)
    ordered = ordered.drop(columns="_row")
    return ordered[from_end >= 2], ordered[from_end == 1], ordered[from_end == 0]


def make_rec_subsets(interactions: pd.DataFrame, min_interactions: int = 3) -> dict[str, pd.DataFrame]:
    """The image and model recommendation subsets of ImageGem (Table 3) from the `interactions` config.

    Images: user–image interactions. Models: user–model interactions, keeping the last timestamp per
    (user, model) (a user who generated many images with a LoRA interacted with it once, last at that time).
    In both, users with fewer than `min_interactions` interactions are removed.

    Example:
        ```python
        >>> from datasets import load_dataset
        >>> df = load_dataset("demo_output/dataset", "interactions", split="train").to_pandas()  # doctest: +SKIP
        >>> subsets = make_rec_subsets(df)  # doctest: +SKIP
        ```
    """
    images = interactions[interactions["itemType"] == "image"]
    models = interactions[interactions["itemType"] == "model"].reset_index(drop=True)
    models = models.assign(_row=range(len(models))).sort_values(["timestamp", "_row"], kind="stable")
    models = models.drop_duplicates(["userHash", "itemId"], keep="last").sort_values("_row").drop(columns="_row")
    return {
        "images": filter_min_interactions(images, min_interactions).reset_index(drop=True),
        "models": filter_min_interactions(models, min_interactions).reset_index(drop=True),
    }


def subset_statistics(subsets: dict[str, pd.DataFrame]) -> str:
    """Table 3 of ImageGem (users, items, interactions, density per subset) as Markdown."""
    lines = ["| subset | users | items | interactions | density |", "|---|---:|---:|---:|---:|"]
    for name, df in subsets.items():
        users, items = df["userHash"].nunique(), df["itemId"].nunique()
        density = len(df) / max(users * items, 1)
        lines.append(f"| {name} | {users:,} | {items:,} | {len(df):,} | {density:.2e} |")
    return "\n".join(lines)
