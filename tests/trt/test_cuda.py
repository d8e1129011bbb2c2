"""runtime/trt/cuda.py over the fake cudart: result unwrapping, error naming, device arrays."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import BackendError
from runtime.trt import cuda, gpu
from tests.trt.fakes import FakeCudart


def test_check_unwraps_results_and_names_failures(fake_cuda) -> None:
    ok = FakeCudart.OK
    assert cuda.check((ok,), "x") is None
    assert cuda.check((ok, 7), "x") == 7
    assert cuda.check((ok, 1, 2), "x") == (1, 2)
    with pytest.raises(BackendError) as err:
        cuda.check((FakeCudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64 bytes for 'x')")
    assert str(err.value).startswith("cudaMalloc(64 bytes for 'x') failed: cudaErrorMemoryAllocation (out of memory)")
    assert "out of memory" in str(err.value).split(";", 1)[1]


def test_a_device_buffer_without_a_usable_gpu_is_a_clear_backend_error() -> None:
    """Real cuda-python on this machine (no driver): an error code, turned into one clear message."""
    if gpu.cudart() is None:
        pytest.skip("cuda-python is not installed")
    if gpu.cuda_devices().ok:
        pytest.skip("this machine has a usable CUDA GPU")
    with pytest.raises(BackendError) as err:
        cuda.DeviceBuffer(16, "a test")
    message = str(err.value)
    assert message.startswith("cudaMalloc(16 bytes for a test) failed: cudaError"), message
    assert "Traceback" not in message and err.value.__cause__ is None and err.value.__context__ is None
    if "cudaErrorInsufficientDriver" in message:
        assert "CUDA driver version is insufficient" in message and "NVIDIA GPU" in message
    with pytest.raises(BackendError, match=r"cudaStreamCreateWithFlags failed: cudaError"):
        cuda.Stream()


def test_device_array_views(fake_cuda) -> None:
    buf = cuda.DeviceBuffer(2 * 3 * 4 * 4)
    whole = buf.array((2, 3, 4), np.float32)
    assert whole.nbytes == 96 and whole.offset(1) == 48 and whole.offset(1, 2) == 48 + 32
    assert whole.at(1) == cuda.DeviceArray(buf.ptr + 48, (3, 4), np.float32)
    with pytest.raises(IndexError):
        whole.offset(2)
    with pytest.raises(ValueError, match="does not fit"):
        buf.array((2, 3, 5), np.float32)
    buf.close()
    assert buf.closed and not fake_cuda.device
    pinned = cuda.PinnedBuffer(8)
    pinned.view(np.float16, (4,))[:] = 1.5                  # float16: no ctypes type needed
    assert pinned.bytes().view(np.float16).tolist() == [1.5] * 4
    pinned.close()
    assert not fake_cuda.host


