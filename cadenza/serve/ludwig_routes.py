"""Ludwig's serving routes, for every model type: `GET /` health, `POST /predict` (one row) and
`POST /batch_predict` (a data set).

/predict takes the row as form fields (Ludwig's client: multipart or url-encoded, one field per input feature) or
as a JSON object; it answers the row's prediction columns as one flat JSON object. /batch_predict takes Ludwig's
form field `dataset` holding a pandas "split" JSON string, or the same split object as a JSON body, or a JSON list
of records; it answers `{index, columns, data}`. Fields that are not input features are ignored, as Ludwig does;
missing input features are a 400 that names them."""

from __future__ import annotations

import json

import pandas as pd
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from .. import __version__
from .errors import HttpError
from .predictor import Predictor

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 1000


def input_columns(config) -> list[str]:
    return [f.column or f.name for f in config.input_features]


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"malformed JSON: {e}") from None


async def _form(request: Request) -> dict:
    form = await request.form(max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS)
    fields = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            raise HttpError(400, f"field {key!r} is a file: this server takes text and tabular inputs only")
        fields[key] = value
    return fields


def _check_features(columns, required: list[str]) -> None:
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise HttpError(400, f"missing input features: {', '.join(repr(c) for c in missing)} (the model takes "
                        f"{', '.join(repr(c) for c in required)})")


def _row_frame(entry, required: list[str]) -> pd.DataFrame:
    if not isinstance(entry, dict):
        raise HttpError(400, f"the body must be one JSON object of input features, not {type(entry).__name__}")
    _check_features(entry, required)
    _check_scalars(entry.items(), "field")
    return pd.DataFrame([entry])


def _check_scalars(items, what: str) -> None:
    for key, value in items:
        if isinstance(value, (dict, list)):
            raise HttpError(400, f"{what} {key!r}: a value must be a string, number, boolean or null, not "
                            f"{type(value).__name__}")


def _split_frame(data) -> pd.DataFrame:
    """pandas' "split" orientation: {"columns": [...], "data": [[...], ...], "index": [...] (optional)}."""
    columns, rows, index = data.get("columns"), data.get("data"), data.get("index")
    if not isinstance(columns, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise HttpError(400, "dataset: expected pandas 'split' JSON: {\"columns\": [names], \"data\": [[values], "
                        "...], \"index\": [labels] (optional)}")
    repeated = sorted({c for c in columns if columns.count(c) > 1}, key=str)
    if repeated:
        raise HttpError(400, f"dataset: column names must be unique; repeated: {', '.join(map(repr, repeated))}")
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise HttpError(400, f"dataset: row {i} has {len(row)} values for {len(columns)} columns")
        _check_scalars(zip(columns, row), f"row {i}, column")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)
                              or any(isinstance(label, (dict, list)) for label in index)):
        raise HttpError(400, f"dataset: index must be a list of {len(rows)} labels (strings or numbers), one per row")
    return pd.DataFrame(rows, columns=columns, index=index)


def _records_frame(records: list) -> pd.DataFrame:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise HttpError(400, f"record {i}: expected a JSON object, not {type(record).__name__}")
        _check_scalars(record.items(), f"record {i}, field")
    return pd.DataFrame.from_records(records)


async def _dataset_frame(request: Request) -> pd.DataFrame:
    if _content_type(request) in FORM_TYPES:
        fields = await _form(request)
        if "dataset" not in fields:
            raise HttpError(400, "missing form field 'dataset' (a pandas 'split' JSON string)")
        try:
            data = json.loads(fields["dataset"])
        except json.JSONDecodeError as e:
            raise HttpError(400, f"form field 'dataset': malformed JSON: {e}") from None
    else:
        data = await _json_body(request)
    if isinstance(data, dict):
        return _split_frame(data)
    if isinstance(data, list):
        return _records_frame(data)
    raise HttpError(400, "the data set must be pandas 'split' JSON (an object) or a list of records")


def _jsonable(predictions: pd.DataFrame) -> dict:
    # pandas' JSON writer turns NaN into null and numpy scalars into numbers; 15 digits keep a float64 intact
    return json.loads(predictions.to_json(orient="split", double_precision=15, default_handler=str))


def router(model, predictor: Predictor) -> APIRouter:
    routes = APIRouter()
    required = input_columns(model.config)

    @routes.get("/")
    async def health() -> dict:
        return {"message": "Cadenza server is up", "model_type": model.config.model_type,
                "cadenza_version": __version__}

    @routes.post("/predict")
    async def predict(request: Request) -> dict:
        if _content_type(request) in FORM_TYPES:
            entry = await _form(request)
        else:
            entry = await _json_body(request)
        predictions = await predictor(_row_frame(entry, required))
        split = _jsonable(predictions)
        return dict(zip(split["columns"], split["data"][0]))

    @routes.post("/batch_predict")
    async def batch_predict(request: Request) -> dict:
        df = await _dataset_frame(request)
        _check_features(df.columns, required)
        if len(df) == 0:
            return {"index": [], "columns": [], "data": []}
        predictions = await predictor(df)
        predictions.index = df.index  # the client's row labels come back with their predictions
        return _jsonable(predictions)

    return routes
