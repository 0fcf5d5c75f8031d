"""torch.compile(fullgraph=True) sees through every normfuse layer: no graph breaks, and the
compiled model matches eager (outputs, gradients, running statistics) on each CPU backend; the
fused activation included."""
import pytest
import torch
from torch import nn

import normfuse

# float32 gradients of this model are ill-conditioned (the last layers' backward sums dy that
# nearly cancels): eager and compiled float32 both sit ~1e-4 from a float64 reference, in
# different directions (inductor reorders the torch backend's reductions). So the torch backend
# is compared in float64, where compiled and eager must agree to rounding; the C++ ops (fake
# implementations in normfuse/_extension.py) run the same kernels either way and are compared
# in both dtypes.
CASES = [(b, d) for b, d in (("cpu", torch.float32), ("cpu", torch.float64),
                             ("torch", torch.float64))
         if b in normfuse.available_backends()]
# With a GPU, the GPU backends too, through aot_eager (its functionalization is where a Triton
# launch passing one tensor as two written pointers returned unwritten memory; Inductor's cold
# compiles would cost the GPU run minutes).
GPU_CASES = [(b, torch.float32) for b in ("cuda", "triton")
             if torch.cuda.is_available() and b in normfuse.available_backends()]
TOL = {torch.float32: dict(out=(1e-4, 1e-4), grad=(1e-3, 1e-4), buf=(1e-5, 1e-6)),
       torch.float64: dict(out=(1e-10, 1e-10), grad=(1e-9, 1e-10), buf=(1e-12, 1e-12))}


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), normfuse.BatchInstanceNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), normfuse.IEBN2d(8), normfuse.AssocNorm(4, 8, activation="relu"),
        normfuse.ILMNorm(8, num_groups=4, key_group_size=2, reduction=2))


@pytest.mark.parametrize("backend,dtype", CASES + GPU_CASES, ids=str)
def test_compile_fullgraph_matches_eager(backend, dtype):
    torch.manual_seed(0)
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    eager = _model().to(device, dtype)
    with torch.no_grad():
        eager[1].gate.uniform_(0, 1)
        eager[4].gate_weight.normal_()
    compiled_model = _model().to(device, dtype)
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 9, 7, dtype=dtype).to(device)
    torch._dynamo.reset()
    with normfuse.use_backend(backend):
        y_ref = eager(x)
        y_ref.square().sum().backward()
        compiled = torch.compile(compiled_model, fullgraph=True,
                                 backend="aot_eager" if device == "cuda" else "inductor")
        y = compiled(x)
        y.square().sum().backward()
    tol = TOL[dtype]
    rtol, atol = tol["out"]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    rtol, atol = tol["grad"]
    for (name, p), p_ref in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol, msg=name)
    rtol, atol = tol["buf"]
    for b, b_ref in zip(compiled_model.buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=rtol, atol=atol)


def _head():
    return nn.Sequential(nn.Linear(6, 16), normfuse.BatchInstanceNorm1d(16, activation="relu"),
                         nn.Linear(16, 3), normfuse.BatchInstanceNorm1d(3, affine=False))


@pytest.mark.parametrize("backend,dtype", CASES, ids=str)
def test_compile_bin_head_on_2d_inputs_matches_eager(backend, dtype):
    """BIN on (N, C) inputs (a head `convert` made of nn.BatchNorm1d) runs as batch norm of one
    sample, x viewed channels-last with weight gamma * rho (normfuse/_autograd.py,
    _bin_as_one_sample, traced here; eager's whole-layer op does the same in C++, and in eval
    mode skips the moments): no graph break, and compiled equals eager in a training step and
    an eval step (outputs, gradients, running statistics)."""
    torch.manual_seed(0)
    eager = _head().to(dtype)
    with torch.no_grad():
        eager[1].gate.uniform_(0, 1)
        eager[3].gate.uniform_(0, 1)
    compiled_model = _head().to(dtype)
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(37, 6, dtype=dtype)
    torch._dynamo.reset()
    tol = TOL[dtype]
    with normfuse.use_backend(backend):
        compiled = torch.compile(compiled_model, fullgraph=True)
        for training in (True, False):
            eager.train(training), compiled_model.train(training)
            y_ref = eager(x)
            y_ref.square().sum().backward()
            y = compiled(x)
            y.square().sum().backward()
            torch.testing.assert_close(y, y_ref, rtol=tol["out"][0], atol=tol["out"][1])
            for (name, p), p_ref in zip(compiled_model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=tol["grad"][0],
                                           atol=tol["grad"][1], msg=f"{name} ({training=})")
            for b, b_ref in zip(compiled_model.buffers(), eager.buffers()):
                torch.testing.assert_close(b, b_ref, rtol=tol["buf"][0], atol=tol["buf"][1])


# The compiled-kernel backends this machine runs natively (the interpreter would only add time).
COPY_BACKENDS = [b for b in ("cpu", "cuda", "triton") if b in normfuse.available_backends()
                 and (b == "cpu" or torch.cuda.is_available())]


@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("layer", ["bin", "iebn", "assoc", "ilm", "bin-2d", "iebn-relu"])
def test_compiled_backward_copies_no_gradient(backend, layer):
    """A compiled channels-last layer's backward graph hands the incoming gradient to the
    backward ops as it comes: no clone. (A stride query on a tensor in a traced backward makes
    Dynamo retrace it with every gradient made contiguous; the layer then made it channels-last
    again, two input-sized copies a layer step: normfuse/_autograd.py, like_layout.) BIN on a
    2-d input takes its (1, C, N) channels-last view, which must not cost a copy either; nor
    the fused ReLU's backward (its mask recomputed from the saved scale and shift)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm)

    recording = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm),
                             bw_compiler=keep_backward)
    c = 8
    m = {"bin": normfuse.BatchInstanceNorm2d(c), "iebn": normfuse.IEBN2d(c),
         "assoc": normfuse.AssocNorm(4, c), "bin-2d": normfuse.BatchInstanceNorm1d(c),
         "ilm": normfuse.ILMNorm(c, num_groups=4, key_group_size=2, reduction=2),
         "iebn-relu": normfuse.IEBN2d(c, activation="relu")}[layer]
    device = "cpu" if backend == "cpu" else "cuda"
    m = m.to(device)
    x = torch.randn(6, c, device=device) if layer == "bin-2d" else \
        torch.randn(2, c, 5, 3, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_()
    torch._dynamo.reset()
    with normfuse.use_backend(backend):
        y = torch.compile(m, backend=recording, fullgraph=True)(x)
        y.backward(torch.randn_like(y))
    assert backward_graphs, "no backward graph was compiled"
    copies = [n for n in backward_graphs[-1].graph.nodes
              if n.op == "call_function" and "clone" in str(n.target)]
    assert not copies, f"the compiled backward copies: {[str(n.target) for n in copies]}"


COLD_SCRIPT = """
import torch, normfuse
from test_compile import _model
torch.manual_seed(0)
compiled_model, eager = _model().double(), _model().double()
eager.load_state_dict(compiled_model.state_dict())
x = torch.randn(4, 3, 9, 7, dtype=torch.float64)
compiled = torch.compile(compiled_model, fullgraph=True)
y = compiled(x)  # before any eager normfuse call
y.square().sum().backward()
y_ref = eager(x)
y_ref.square().sum().backward()
torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
for p, p_ref in zip(compiled_model.parameters(), eager.parameters()):
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10)
# Later steps reuse that compile: no lazily filled normfuse global may be guarded on (the trace
# of the first call once filled a cache and so compiled the model twice).
torch._dynamo.config.error_on_recompile = True
for _ in range(2):
    compiled(x).square().sum().backward()
print("ok")
"""


def test_compile_before_any_eager_call():
    """A fresh process whose first normfuse call is torch.compile(fullgraph=True): the lazy
    set-up of the eager path (a torch.library registration, which Dynamo cannot trace) must stay
    out of the compiled frame, and later steps must not recompile. The test above runs eager
    first and would not see either."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", COLD_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


def _layout_model(c=8):
    """conv -> layer (-> ReLU) blocks, contiguous, whose convolutions Inductor may lay out
    channels-last on its own."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), normfuse.BatchInstanceNorm2d(c, activation="relu"),
        nn.Conv2d(c, c, 3, padding=1), normfuse.IEBN2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 1), normfuse.AssocNorm(4, c))


# (backend, dynamic): on a GPU the cuda backend too, static shapes only (Inductor's GPU compiles
# cost the GPU run's time)
LAYOUT_CASES = [(b, d) for b, d in (("cpu", False), ("cpu", True), ("cuda", False))
                if b in normfuse.available_backends() and (b == "cpu" or torch.cuda.is_available())]


@pytest.mark.parametrize("backend,dynamic", LAYOUT_CASES, ids=str)
def test_inductor_hands_the_convolution_output_to_the_layer(backend, dynamic):
    """Inductor lays convolutions out channels-last even in a contiguous model; the generic ops'
    layout constraint (normfuse/_inductor_layouts.py) takes the convolution's output as it is,
    where the default one (the traced, contiguous strides) converted every layer's input back,
    twice, and the gradient in the backward (a compiled contiguous ResNet-20 step: 1.05-1.08x
    the compiled BatchNorm step). The compiled model still equals eager, outputs, every
    gradient and the running statistics, also with dynamic shapes."""
    from torch._inductor.utils import run_and_get_code

    from normfuse import _inductor_layouts

    torch.manual_seed(0)
    device = "cuda" if backend == "cuda" else "cpu"
    eager, model = _layout_model().to(device), _layout_model().to(device)
    model.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 12, 10, device=device)
    torch._dynamo.reset()
    # (no FX graph cache: a graph cached by a process without the constraint would be reused)
    with normfuse.use_backend(backend), torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model, dynamic=dynamic)

        def step():
            y = compiled(x)
            y.square().sum().backward()
            return y
        y, codes = run_and_get_code(step)
        y_ref = eager(x)
        y_ref.square().sum().backward()
    assert _inductor_layouts.registered()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for (name, p), p_ref in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4, msg=name)
    for b, b_ref in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)
    # The generated code, with dynamic shapes too (symbolic strides the constraint must still
    # recognise as the convolution's channels-last ones): the forward's moments read each
    # convolution's buffer, and the backward's two passes the saved convolution output itself.
    import re
    forward, backward = codes[0], codes[1]
    convolutions = set(re.findall(r"(buf\d+) = extern_kernels\.convolution\(", forward))
    moments_inputs = re.findall(r"torch\.ops\.normfuse\.moments\.default\((buf\d+)\)", forward)
    assert len(convolutions) == 3 and len(moments_inputs) == 3, forward[-3000:]
    assert set(moments_inputs) <= convolutions, \
        f"moments reads {moments_inputs}, not the convolutions' outputs {convolutions}: a layout copy"
    backward_inputs = re.findall(
        r"torch\.ops\.normfuse\.backward_(?:sums|apply)\.default\(\w+, (\w+)", backward)
    assert len(backward_inputs) == 6, backward[-3000:]
    assert all(re.fullmatch(r"convolution(_\d+)?", name) for name in backward_inputs), \
        f"the backward passes read {backward_inputs}, not the saved convolution outputs: a layout copy"
