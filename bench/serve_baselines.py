"""What users write instead of `edgeft serve`: a FastAPI app that calls a model per request.

    python bench/serve_baselines.py pipeline FINETUNED_DIR --port 8001 --max-length 64   # transformers pipeline, torch fp32
    python bench/serve_baselines.py optimum  ONNX_DIR      --port 8002 --max-length 64   # optimum ORTModel, int8 file

Both answer the TEI-style ``POST /predict`` (``{"inputs": "text"}`` -> ``[{"label", "score"}]``) that
`edgeft serve` also answers, so one load generator and one request file serve all of them. The code
is deliberately the plain tutorial shape (a sync endpoint, which FastAPI runs in its thread pool;
library defaults for threads), because that is what is being compared against.
"""

from __future__ import annotations

import argparse
import os

from pydantic import BaseModel  # at module level: FastAPI resolves the body model's annotations here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_classifier(kind: str, model_dir: str, max_length: int):
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "pipeline":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    else:
        from optimum.onnxruntime import ORTModelForSequenceClassification

        from edgeft.safeio import check_onnx_external_data

        check_onnx_external_data(os.path.join(model_dir, "model.onnx"))  # every ONNX load goes through the check
        model = ORTModelForSequenceClassification.from_pretrained(model_dir, file_name="model.onnx")
    clf = pipeline("text-classification", model=model, tokenizer=tok, truncation=True, max_length=max_length)
    clf("warm-up")
    return clf


class PredictRequest(BaseModel):
    inputs: str | list[str]


def build_app(clf):
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/predict")
    def predict(req: PredictRequest):
        return clf(req.inputs)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["pipeline", "optimum"])
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    import uvicorn

    app = build_app(build_classifier(a.kind, a.model_dir, a.max_length))
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
