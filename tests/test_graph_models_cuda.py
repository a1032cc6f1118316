"""The fused engine's newer rules on a GPU: class-written models in float64 against the per-task
`create_graph` oracle there, every order: attention and the Transformer layers (the oracle on PyTorch's
math attention, whose double backward exists), Transformer layers with dropout (the oracle drawing fastmaml's
masks), a ViT as timm writes it, transposed and 3-D convolutions (cuDNN), recurrent layers through torch.func
(cuDNN's RNN has no double backward: off in both, as the engine runs them), ResNet-12. Skipped without CUDA
(run by benchmarks/gpu_check.sh)."""

import contextlib

import pytest
import torch
from test_dropout import DropTransformer, OracleMasks, fixed_seed, maml_scopes  # noqa: F401 (a fixture)
from test_graph_attention import Encoder, Seq2Seq
from test_graph_conv_transpose import Decoder
from test_graph_functional_layers import Recurrent
from test_graph_models import ORDERS, check_ce, on_fused, tasks_for
from test_graph_vision_transformers import ViT
from torch.nn.attention import SDPBackend, sdpa_kernel

from class_models import ResNet12

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def math_attention():
    return sdpa_kernel(SDPBackend.MATH)


def no_cudnn():
    return torch.backends.cudnn.flags(enabled=False)


# name: (model, per-example input shape, what the oracle runs under)
CASES = {
    "vit": (ViT, (1, 8, 8), contextlib.nullcontext),
    "encoder": (Encoder, (5, 3), math_attention),
    "seq2seq": (Seq2Seq, (5, 3), math_attention),
    "conv_transpose": (Decoder, (2, 6, 6), contextlib.nullcontext),
    "recurrent": (Recurrent, (5, 3), no_cudnn),
    "resnet12": (lambda: ResNet12(widths=(3, 4, 3, 4)), (3, 16, 16), contextlib.nullcontext),
}


def cuda_tasks(shape, seed=0):
    return tuple(t.cuda() for t in tasks_for(shape, ways=3, shots=2, seed=seed))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("order", ORDERS)
def test_class_written_models_on_cuda(name, order):
    make, shape, oracle_context = CASES[name]
    torch.manual_seed(0)
    model = make().double().cuda()
    on_fused(model)
    with oracle_context():
        check_ce(model, cuda_tasks(shape), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_transformer_dropout_on_cuda(order):
    torch.manual_seed(1)
    model = DropTransformer().double().cuda()
    on_fused(model)
    with math_attention(), OracleMasks() as masks:
        check_ce(model, cuda_tasks((5, 3), 1), inner_lr=0.3, steps=2, order=order, before_forward=maml_scopes(masks, 2))
