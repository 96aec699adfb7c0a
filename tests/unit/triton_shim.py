"""A minimal test double for Triton's ``triton_python_backend_utils``: only what edgeft's generated model.py
files use (Tensor, InferenceRequest/Response, TritonError, get_input_tensor_by_name), with the real
module's behaviour for BYTES tensors (numpy object arrays of ``bytes``)."""

from __future__ import annotations

import numpy as np


class TritonError(Exception):
    def __init__(self, msg: str):
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        if not isinstance(array, np.ndarray):
            raise TritonError(f"tensor '{name}' must be a numpy array, got {type(array).__name__}")
        if array.dtype.kind in ("U", "S"):  # Triton hands BYTES tensors over as object arrays of bytes
            array = np.array([x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.reshape(-1)],
                             dtype=np.object_).reshape(array.shape)
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceRequest:
    def __init__(self, inputs: list[Tensor]):
        self._inputs = list(inputs)

    def inputs(self) -> list[Tensor]:
        return self._inputs


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None):
        self._outputs, self._error = list(output_tensors), error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)
