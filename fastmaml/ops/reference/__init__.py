"""The plain-PyTorch reference of every op (backend "torch"): the fallback of every kernel and its test
oracle. One module per op family; each function has the name of the op it registers:

    step.py        inner_update, adjoint_update
    linear.py      linear_fwd, linear_value_tangent_fwd, linear_bwd, linear_tangent_bwd
    normalize.py   the math of x̂ = (x − mean) / std and of the affine map after it (no ops: shared)
    batchnorm.py   batchnorm_*, batchnorm_relu_* (batch or fixed statistics)
    example_norm.py examplenorm_* (LayerNorm, GroupNorm, InstanceNorm: statistics per example)
    block_tail.py  bn_relu_maxpool_{train,tangent}_{fwd,bwd} (BatchNorm2d + ReLU + MaxPool2d), relu_maxpool_fwd
    loss.py        mse_grad, mse_grad_tangent, cross_entropy_grad, cross_entropy_grad_tangent
    mlp.py         mlp_meta_step (the whole inner loop of an MLP)
"""

from . import batchnorm, block_tail, example_norm, linear, loss, mlp, step  # noqa: F401  (register the references)
