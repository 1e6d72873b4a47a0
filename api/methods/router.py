"""GET /v1/methods, published from core.catalog so it always matches what specs are validated against."""
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api.dependencies import ProjectId
from api.errors import V1_ERRORS
from core.catalog import METHODS

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=V1_ERRORS)


class AlgorithmObject(BaseModel):
    name: str
    summary: str
    params_schema: dict[str, Any]


class MethodObject(BaseModel):
    object: Literal["method"] = "method"
    name: str
    summary: str
    default_algorithm: str
    algorithms: list[AlgorithmObject]


class MethodList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MethodObject]
    has_more: bool = False


@router.get("", response_model=MethodList)
def list_methods(_: ProjectId):
    return MethodList(data=[
        MethodObject(name=m.name, summary=m.summary, default_algorithm=m.default_algorithm,
                     algorithms=[AlgorithmObject(name=a.name, summary=a.summary,
                                                 params_schema=a.params.model_json_schema())
                                 for a in m.algorithms.values()])
        for m in METHODS.values()])
