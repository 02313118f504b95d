"""Where the kernel tests run: the TRITON_INTERPRET=1 child of test_kernels_interpreter.py (CPU
tensors, interpreted kernels) or a CUDA machine (compiled kernels). Test files import `device`
(an autouse fixture) and call `skip_unless_kernels_run()` at module level."""
import pytest
import torch

from kernels._triton_support import INTERPRET

DEVICES = ["cpu"] if INTERPRET else ["cuda"] if torch.cuda.is_available() else []


def skip_unless_kernels_run() -> None:
    if not DEVICES:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_kernels_interpreter.py, or on a GPU",
                    allow_module_level=True)


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """Every tensor a test creates lands on the device under test."""
    torch.manual_seed(0)
    with torch.device(request.param):
        yield request.param
