"""The HTTP side port: /healthz, /spec and Prometheus /metrics, for load balancers,
container health checks and scrapers that do not speak gRPC."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import TeacherMetrics
from .spec import TeacherSpec


def build_http_app(spec: TeacherSpec, metrics: TeacherMetrics, is_serving: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title=f"teacher {spec.name}", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        serving = is_serving()
        return JSONResponse(
            {"status": "SERVING" if serving else "NOT_SERVING", "teacher": spec.name},
            status_code=200 if serving else 503,
        )

    @app.get("/spec")
    def get_spec() -> dict:
        return spec.to_dict()

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
