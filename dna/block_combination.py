"""How the ratings of a network's blocks make its rating: DNA's equal-weight sum, a sum of per-block z-scores (each
block's scores standardised over its candidates), and DONNA's accuracy predictor (a linear model from the block
ratings to trained accuracy, fitted on the networks the rank stage trained and judged leave-one-out)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def block_columns(frame: pd.DataFrame) -> list[str]:
    return sorted((c for c in frame.columns if c.startswith("rating_block_")), key=lambda c: int(c.rsplit("_", 1)[1]))


def zscore_rating(frame: pd.DataFrame, ratings: list[pd.DataFrame]) -> np.ndarray:
    """Each network's sum over blocks of (block rating - mean) / std over that block's distinct candidates (lower is
    better): a block whose candidates spread widely weighs no more than one whose candidates barely differ."""
    total = np.zeros(len(frame))
    for column, table in zip(block_columns(frame), ratings):
        scores = table.drop_duplicates(["cell", "path"])["score"].to_numpy(float)
        spread = scores.std() or 1.0
        total += (frame[column].to_numpy(float) - scores.mean()) / spread
    return total


def loo_predictions(features: np.ndarray, accuracy: np.ndarray) -> np.ndarray | None:
    """Leave-one-out predictions of a linear model from block ratings to accuracy: each network's accuracy predicted
    by the model fitted on all the others (None with too few networks to fit one: at least features + 3)."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_predict

    features, accuracy = np.asarray(features, float), np.asarray(accuracy, float)
    if len(accuracy) < features.shape[1] + 3:
        return None
    return cross_val_predict(LinearRegression(), features, accuracy, cv=LeaveOneOut())


def fit_predictor(features: np.ndarray, accuracy: np.ndarray, columns: list[str]) -> dict:
    """The linear model fitted on every network: its intercept and a weight per block rating."""
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(np.asarray(features, float), np.asarray(accuracy, float))
    return {"intercept": float(model.intercept_), "weights": dict(zip(columns, map(float, model.coef_)))}
