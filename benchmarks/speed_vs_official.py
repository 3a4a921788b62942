"""One training step of diffreg's models against the official code, side by side in one process, on the CPU.

For each model the official network and loss and diffreg's are built at the paper configuration (the official
widths; smaller inputs than the papers' so that a CPU step takes seconds, or half a minute for DiffuseReg), the same
batch is fed to both, and a training step (forward, loss, backward, optimiser step, and what the official loop does
besides: gradient clipping, the EMA teacher) is timed alternately, ours then theirs, ``--steps`` times after two
warm-up steps each. The ratio is diffreg's median over the official median: above 1.0, diffreg is slower, and the
script prints a profile of both steps (the operators that take the time). The parameter counts of both networks are
reported, with how many of them never receive a gradient (dead weights, which the official code of some models has).

Models, their official code and inputs (batch ``--batch``):

* CorrMLP and FlowReg (``mathpluscode/FlowReg``, which re-implements CorrMLP): ``--size`` (16 x 64 x 64). The official
  step is that of ``flowreg/train.py`` (for FlowReg its reflow phase, 98 of the 100 epochs: the body of its loop
  over the batches, read from the checkout by :func:`official_loop_body` and run as it is).
* DiffuseReg (``YutaZhuo/DiffuseReg``): ``--diffusereg-size`` (32 x 64 x 64, the smallest volume that the official
  Swin-UNETR accepts with its window 2 x 4 x 4: every side a multiple of 32, H and W at least 64), feature size
  ``--diffusereg-feature-size`` for both (120, the official ``config/train_3D.json``: ~437 M parameters). The official
  step is ``DDPM.optimize_parameters`` of ``model/model.py`` (AdamW over ``netG.parameters()``;
  ``GaussianDiffusion.p_losses``).
* LDM-Morph (``wujiong-hub/LDM-Morph``): ``--ldm-morph-size`` (128 x 128, the paper's 2D images). The step is the
  registration network's (stage 2); the autoencoder and the latent U-Net of stage 1 are frozen in both and untrained
  (a step costs the same whatever their weights). The official step is the body of the training loop of
  ``train.py`` (Adam, lr 1e-4, ``beta`` 0.6, ``smth_labda`` 0.01, features at ``t_enc = 1``).

The official code is not part of this project: give the paths of checkouts that you provide (``--flowreg``,
``--diffusereg``, ``--ldm-morph``; the models of the checkouts given are timed). Nothing of it is copied or
committed; it is imported from those paths at run time, each checkout's top-level packages set apart from the
others' while it is imported and its objects are built (FlowReg and LDM-Morph both have a ``utils``). Stubbed or
patched, in memory only:

* FlowReg: a missing ``huggingface_hub`` is stubbed (only its hub mix-in class is used). Its networks make no CUDA
  calls.
* DiffuseReg: MONAI's ``deprecated_arg`` decorator is a pass-through while ``swin_unetR`` is imported (MONAI >= 1.5
  raises on the ``img_size`` argument that the official ``SwinUNETR`` requires). While the official model is built,
  ``Tensor.to`` and ``Tensor.cuda`` keep tensors on the CPU (``set_loss`` builds an NCC loss, not used by the
  training loss, with its filter on ``cuda:0``); the step itself runs unpatched. ``networks.define_G`` cannot build
  the model (it names an undefined ``unet`` and loads a VTN checkpoint), so ``GaussianDiffusion`` is built with the
  arguments that it passes and the values of ``train_3D.json``, and ``DDPM.optimize_parameters`` runs on a ``DDPM``
  whose attributes are set as its constructor sets them. The frozen network that gives ``phi_0`` (``bootstrap``, a
  pre-trained VTN cascade: a checkpoint, an affine stem hard-wired to 32 x 128 x 128 and a ``.cuda()`` in its
  forward) is replaced by diffreg's teacher VoxelMorph, the same frozen module in both steps.
* LDM-Morph: missing modules are stubbed: ``pytorch_lightning`` (``LightningModule`` is ``torch.nn.Module``,
  ``rank_zero_only`` the identity), ``torchvision.utils.make_grid`` (logging), ``ml_collections.ConfigDict`` (an
  attribute namespace), ``timm.models.layers`` (MONAI's equivalent ``DropPath`` and ``trunc_normal_``),
  ``pystrum`` (evaluation) and taming's ``VectorQuantizer2`` (its codebook only: the step encodes with
  ``VQModelInterface.encode``, which stops before the quantiser). The LDM is built from
  ``configs/latent-diffusion/casmus-ldm-vq16-64ch.yaml`` without its checkpoint and with the autoencoder's training
  loss (taming's LPIPS + discriminator, never called here) replaced by ``torch.nn.Identity``. ``train.py`` parses
  its arguments and trains when imported, so the body of its training loop is read from the checkout
  (:func:`official_loop_body`: the statements up to ``optimizer.step()``, its ``.cuda()`` calls removed) and run
  with the official objects.

Usage::

    git clone https://github.com/mathpluscode/FlowReg /path/to/FlowReg      # commit 286411e was timed
    git clone https://github.com/YutaZhuo/DiffuseReg /path/to/DiffuseReg    # commit 95b1ad8
    git clone https://github.com/wujiong-hub/LDM-Morph /path/to/LDM-Morph   # commit e25f1af
    python benchmarks/speed_vs_official.py --flowreg /path/to/FlowReg --diffusereg /path/to/DiffuseReg \\
        --ldm-morph /path/to/LDM-Morph --out benchmarks/speed_vs_official.md
"""

from __future__ import annotations

import argparse
import ast
import os
import collections.abc
import contextlib
import copy
import datetime
import importlib
import io
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffreg.config import get_config  # noqa: E402
from diffreg.device import FAST_PATH_VARIABLE  # noqa: E402
from diffreg.models import build  # noqa: E402
from diffreg.train import make_optimizer, train_step  # noqa: E402

#: the top-level packages of each official checkout that the script imports
FLOWREG_PACKAGES = ("corrmlp", "flowreg", "utils")
DIFFUSEREG_PACKAGES = ("model",)
LDM_MORPH_PACKAGES = ("ldm", "TransModels", "utils", "taming")


def _missing(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return True
    return False


@contextlib.contextmanager
def checkout(path: Path, packages: tuple[str, ...], stubs: tuple[tuple[str, dict], ...] = ()):
    """Import from the official checkout ``path``: its top-level ``packages`` come from there (modules of the same
    names imported before, another checkout's ``utils`` say, are set aside and put back afterwards), and every
    ``(module name, attributes)`` of ``stubs`` that cannot be imported is a stub module meanwhile. Build the official
    objects inside the block."""
    def own(name: str) -> bool:
        return name.split(".")[0] in packages

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if own(k)}
    sys.path.insert(0, str(path))
    stubbed = []
    try:
        for name, attributes in stubs:
            if _missing(name):
                module = types.ModuleType(name)
                module.__dict__.update(attributes)
                sys.modules[name] = module
                stubbed.append(name)
        yield
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if own(k)] + stubbed:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


@contextlib.contextmanager
def on_cpu():
    """``Tensor.to`` a CUDA device and ``Tensor.cuda()`` leave tensors on the CPU (for official code that puts
    tensors on the GPU when it is built)."""
    to, cuda = torch.Tensor.to, torch.Tensor.cuda

    def cpu(device):
        return "cpu" if isinstance(device, (str, torch.device)) and str(device).startswith("cuda") else device

    def to_cpu(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return to(self, *(cpu(x) for x in args), **kwargs)

    torch.Tensor.to, torch.Tensor.cuda = to_cpu, lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda = to, cuda


# ----------------------------------------------------------------------------------------------------------------
# CorrMLP and FlowReg (mathpluscode/FlowReg)
# ----------------------------------------------------------------------------------------------------------------

def _flowreg_modules(path: Path) -> dict[str, types.ModuleType]:
    hub = (("huggingface_hub", {"PyTorchModelHubMixin": type("PyTorchModelHubMixin", (), {})}),)
    with checkout(path, FLOWREG_PACKAGES, hub):
        return {name: importlib.import_module(name)
                for name in ("corrmlp.networks", "flowreg.networks", "utils.losses")}


def _official_corrmlp_step(path, size, ours, a):
    mods = _flowreg_modules(path)
    net = mods["corrmlp.networks"].CorrMLP(1, 8, 16, use_checkpoint=False)
    ncc, grad = mods["utils.losses"].NCC(win=9), mods["utils.losses"].Grad("l2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(fixed, moving):
        warped, flow = net(fixed, moving)
        loss = ncc.loss(fixed, warped) + grad.loss(None, flow) * 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()

    return net, step


def _official_flowreg_step(path, size, ours, a):
    mods = _flowreg_modules(path)
    nets = mods["flowreg.networks"]
    net = nets.FlowReg(1, 8, 16, 64, use_checkpoint=False)
    teacher = copy.deepcopy(net).requires_grad_(False).eval()
    stn = nets.SpatialTransformer(mode="bilinear")
    ncc, grad = mods["utils.losses"].NCC(win=9), mods["utils.losses"].Grad("l2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sp = (3.15, 1.5, 1.5)   # data/util.py SPACING (z, y, x)

    # one reflow step (the phase of 98 of the 100 epochs): the body of flowreg/train.py's loop over the batches,
    # from the checkout, in its ed2es direction; the images come in as the loader's [-1, 1]
    script = path / "flowreg" / "train.py"
    body = official_loop_body(script, "train_loader", "ema_update(teacher, model, ema_momentum)",
                              first="if args.direction")
    names = {"torch": torch, "F": F, "args": types.SimpleNamespace(direction="ed2es"), "device": torch.device("cpu"),
             "SPACING": sp, "is_warmup": False, "model": net, "teacher": teacher, "stn": stn, "ncc_loss": ncc,
             "grad_loss": grad, "reg_weight": 1.0, "v_mse_weight": 1.0, "optimizer": opt, "ema_momentum": 0.99,
             "ema_update": official_function(script, "ema_update", {"torch": torch})}

    def step(fixed, moving):
        exec(body, {**names, "data": {"F": fixed * 2 - 1, "M": moving * 2 - 1}})

    return net, step


# ----------------------------------------------------------------------------------------------------------------
# DiffuseReg (YutaZhuo/DiffuseReg)
# ----------------------------------------------------------------------------------------------------------------

class _Bootstrap:
    """The official ``bootstrap`` interface (``eval()``; ``(fixed, moving) -> (flows, warps, results)``, the field
    ``phi_0`` in ``flows[-1]``) around diffreg's frozen teacher. Not a module: the official VTN cascade keeps its
    networks in a Python list, so they are not among ``netG.parameters()`` either."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def eval(self) -> "_Bootstrap":
        self.net.eval()
        return self

    def __call__(self, fixed, moving):
        return [self.net(moving, fixed)], None, None


def _official_diffusereg_step(path, size, ours, a):
    conf = json.loads((path / "config" / "train_3D.json").read_text())
    model_conf, optim_conf = conf["model"], conf["train"]["optimizer"]
    swin = {**model_conf["swin_unetR"], "img_size": list(size), "feature_size": a.diffusereg_feature_size}
    deprecate = importlib.import_module("monai.utils.deprecate_utils")
    with checkout(path, DIFFUSEREG_PACKAGES):
        keep = deprecate.deprecated_arg
        deprecate.deprecated_arg = lambda *args, **kwargs: (lambda f: f)
        try:
            swin_unetr = importlib.import_module("model.diffusion_3D.swin_unetR")
        finally:
            deprecate.deprecated_arg = keep
        cfg_diffusion = importlib.import_module("model.diffusion_3D.CFG_diffusion")
        unet = importlib.import_module("model.diffusion_3D.unet")
        ddpm_module = importlib.import_module("model.model")
        with on_cpu():
            net = swin_unetr.SwinUNETR(**swin)
            # networks.define_G's arguments; the keys missing from train_3D.json (at 95b1ad8) read None there
            net_g = cfg_diffusion.GaussianDiffusion(
                net, unet.SpatialTransform(list(size)), _Bootstrap(ours.teacher), channels=None, loss_type="l2",
                conditional=model_conf["diffusion"]["conditional"], schedule_opt=model_conf["beta_schedule"]["train"],
                loss_lambda=None, gamma=None, scaler=None, mean=model_conf["diffusion"]["flow_mean"],
                std=model_conf["diffusion"]["flow_std"])
            # DDPM.__init__: set_loss, the training noise schedule, train mode, AdamW over netG.parameters()
            net_g.set_loss("cpu")
            net_g.set_new_noise_schedule(model_conf["beta_schedule"]["train"], "cpu")
    net_g.train()
    ddpm = object.__new__(ddpm_module.DDPM)
    ddpm.opt = {"phase": "train", "train": {"amp": conf["train"]["amp"]}}
    ddpm.netG = net_g
    ddpm.optG = torch.optim.AdamW(list(net_g.parameters()), lr=optim_conf["lr"],
                                  weight_decay=optim_conf["weight_decay"])
    ddpm.log_dict = {}

    def step(fixed, moving):   # train_acdc.py: feed_data, then optimize_parameters
        ddpm.data = {"M": moving, "F": fixed}
        ddpm.optimize_parameters()

    return net, step


# ----------------------------------------------------------------------------------------------------------------
# LDM-Morph (wujiong-hub/LDM-Morph)
# ----------------------------------------------------------------------------------------------------------------

class _Codebook(nn.Module):
    """Stands in for taming's ``VectorQuantizer2``: its codebook parameters only (never called in the step)."""

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, sane_index_shape=False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_e, e_dim)


def _ntuple(n):
    return lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x,) * n


def _ldm_morph_stubs() -> tuple[tuple[str, dict], ...]:
    from monai.networks.layers import DropPath, trunc_normal_

    return (
        ("pytorch_lightning", {"LightningModule": nn.Module}),
        ("pytorch_lightning.utilities", {}),
        ("pytorch_lightning.utilities.distributed", {"rank_zero_only": lambda f: f}),
        ("torchvision", {}),
        ("torchvision.utils", {"make_grid": None}),
        ("ml_collections", {"ConfigDict": type("ConfigDict", (types.SimpleNamespace,), {})}),
        ("timm", {}),
        ("timm.models", {}),
        ("timm.models.layers", {"DropPath": DropPath, "trunc_normal_": trunc_normal_, "to_2tuple": _ntuple(2),
                                "to_3tuple": _ntuple(3)}),
        ("pystrum", {}),
        ("pystrum.pynd", {}),
        ("pystrum.pynd.ndutils", {}),
        ("taming", {}),
        ("taming.modules", {}),
        ("taming.modules.vqvae", {}),
        ("taming.modules.vqvae.quantize", {"VectorQuantizer2": _Codebook}),
    )


def official_loop_body(script: Path, loader: str, last: str, first: str | None = None):
    """The statements of ``script``'s loop over ``loader`` (a ``for`` whose iterable mentions it) from the one that
    starts with ``first`` (default: the first) up to the one that reads ``last``, compiled, with every argument-free
    ``.cuda()`` call replaced by its receiver (the tensors stay where they are). Used where an official training step
    exists only as the body of a loop in a script: the step that is timed is the checkout's own text."""
    tree = ast.parse(script.read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For) and loader in ast.unparse(n.iter))
    body, started = [], first is None
    for stmt in loop.body:
        started = started or ast.unparse(stmt).startswith(first)
        if started:
            body.append(stmt)
        if started and ast.unparse(stmt).strip() == last:
            break
    else:
        raise ValueError(f"{script}: no statement {last!r} in the loop over {loader}")

    class _NoCuda(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
                return node.func.value
            return node

    module = ast.fix_missing_locations(ast.Module(body=[_NoCuda().visit(s) for s in body], type_ignores=[]))
    return compile(module, str(script), "exec")


def official_function(script: Path, name: str, names: dict):
    """The function ``name`` defined at the top level of ``script``, compiled from the checkout's text with
    ``names`` as its globals (for a script that cannot be imported: it needs packages or data at import)."""
    tree = ast.parse(script.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(names)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(script), "exec"), scope)
    return scope[name]


def _official_ldm_morph_step(path, size, ours, a):
    import yaml

    conf = yaml.safe_load((path / "configs" / "latent-diffusion" / "casmus-ldm-vq16-64ch.yaml").read_text())["model"]
    first_stage = conf["params"]["first_stage_config"]["params"]
    first_stage.pop("ckpt_path", None)
    first_stage["lossconfig"] = {"target": "torch.nn.Identity"}
    with checkout(path, LDM_MORPH_PACKAGES, _ldm_morph_stubs()):
        util = importlib.import_module("ldm.util")
        ldm_morph = importlib.import_module("TransModels.LDMMorph")
        reg_utils = importlib.import_module("utils.utils")
        with contextlib.redirect_stdout(io.StringIO()):
            ldm_model = util.instantiate_from_config(conf)   # train.py: load_model_from_config
        ldm_model.eval()
        net = ldm_morph.LDMMorph(128 * 2, 192 * 2, 320 * 2, 448 * 2)
    similarity, smoothness = reg_utils.MSE().loss, reg_utils.smoothloss
    transform = reg_utils.SpatialTransform()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    beta, smooth, t_enc = 0.6, 0.01, 1   # train.py defaults

    # the body of train.py's training loop, read from the checkout and run as it is (CUDA calls removed)
    body = official_loop_body(path / "train.py", "train_loader", "optimizer.step()")
    names = {"torch": torch, "default": util.default, "ldm_model": ldm_model, "model": net, "transform": transform,
             "loss_similarity": similarity, "loss_smooth": smoothness, "optimizer": opt, "beta": beta,
             "smooth": smooth, "t_enc": t_enc}

    def step(fixed, moving):   # X moving, Y fixed
        exec(body, {**names, "X": moving, "Y": fixed})

    return net, step


# ----------------------------------------------------------------------------------------------------------------
# diffreg and the timing
# ----------------------------------------------------------------------------------------------------------------

def _diffreg_step(method, size, a):
    cfg = get_config(method, "paper")
    cfg.data.size = tuple(size)
    if method == "diffusereg":
        cfg.model["feature_size"] = a.diffusereg_feature_size
    model = build(cfg)
    if method == "flowreg":
        model.warmup_done.fill_(True)   # time the reflow step
    if method == "ldm-morph":
        model.stage1_ready.fill_(True)   # stage 1 frozen (untrained, as the official one here)
    model.train()
    opt = make_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(fixed, moving):
        train_step(model.loss, {"moving": moving, "fixed": fixed}, opt, scaler, cfg.train.grad_clip,
                   model.parameters())

    return model, step


#: model -> (official step builder, checkout option, official repository)
OFFICIAL = {
    "corrmlp": (_official_corrmlp_step, "flowreg", "mathpluscode/FlowReg"),
    "flowreg": (_official_flowreg_step, "flowreg", "mathpluscode/FlowReg"),
    "diffusereg": (_official_diffusereg_step, "diffusereg", "YutaZhuo/DiffuseReg"),
    "ldm-morph": (_official_ldm_morph_step, "ldm_morph", "wujiong-hub/LDM-Morph"),
}

#: what each row measures besides the table (written under it)
NOTES = {
    "corrmlp": "CorrMLP, FlowReg: the official networks were built with `use_checkpoint=False`: their default "
               "recomputes activations in the backward pass to save memory, which is slower and is not a property "
               "of the model.",
    "diffusereg": "DiffuseReg: both denoisers at the feature size above (120: the paper's, from the official "
                  "`train_3D.json`; depths 2/2/2/2, heads 3/6/12/24, window 2 x 4 x 4), on the smallest volume the "
                  "official Swin-UNETR accepts with that window. The official count includes the image encoder's "
                  "last Swin stage and patch merging, which feed nothing (its parameters without gradient); "
                  "diffreg leaves them out. Both steps take `phi_0` from the same frozen teacher (diffreg's "
                  "VoxelMorph; the official pre-trained VTN cascade is hard-wired to 32 x 128 x 128 and needs a "
                  "GPU), so they differ in the denoiser, the loss and the optimiser only. diffreg's fused "
                  "attention computes the queries of the field tokens only (the others are discarded by eq. 2), "
                  "with its conditional mask (`mask=\"paper\"`) where the official code tiles the shifted-window "
                  "mask.",
    "ldm-morph": "LDM-Morph: stage 1 is frozen and untrained in both. The latent U-Nets have the same 22,409,537 "
                 "parameters; the autoencoders differ (official: the LDM VQGAN encoder, with attention and a middle "
                 "block; diffreg: a MONAI VQ-VAE). The official count includes parameters without gradient (the "
                 "decoder convolutions that its forward skips, two LWSA convolutions, unused LWCA LayerNorms); "
                 "diffreg leaves them out and has 1,179,648 more in its first decoder block (the deepest LGCA "
                 "output concatenates both branches, as sec. 3.3.2 describes). The feature extraction differs: the "
                 "official loop noises the latents with `q_sample` to `t = 1` and runs the U-Net once per image "
                 "*with* gradients (the backward pass goes through its encoder half, though its parameters are not "
                 "optimised); diffreg's paper profile runs DDIM inversion (two U-Net passes) and the feature pass "
                 "without gradients. The official latent term `E(M o phi)` is detached (it trains nothing); "
                 "diffreg's back-propagates through the frozen encoder.",
}


def _count(model: nn.Module, trainable_only: bool) -> tuple[int, int]:
    """(parameters, of which without a gradient after the last step)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.grad is None)


def time_pair(method, path, size, steps, batch, a):
    torch.manual_seed(0)
    fixed, moving = torch.rand(batch, 1, *size), torch.rand(batch, 1, *size)
    ours_model, ours = _diffreg_step(method, size, a)
    theirs_model, theirs = OFFICIAL[method][0](path, size, ours_model, a)
    times = {"diffreg": [], "official": []}
    for i in range(steps + 2):
        for name, fn in (("diffreg", ours), ("official", theirs)):
            t0 = time.perf_counter()
            fn(fixed, moving)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    params = (_count(ours_model, trainable_only=True), _count(theirs_model, trainable_only=False))
    return times, params, (ours, theirs, fixed, moving)


def profile(fn, fixed, moving, rows=8) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(fixed, moving)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    # Both sides run the convolution kernels PyTorch picks: diffreg's oneDNN fast path for 3D convolutions at batch 1
    # (diffreg.device.cpu_conv3d_fast_path) is a setting, not a property of the implementation, and it is off here.
    os.environ[FAST_PATH_VARIABLE] = "0"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flowreg", type=Path, default=None,
                    help="a checkout of mathpluscode/FlowReg (times CorrMLP and FlowReg)")
    ap.add_argument("--diffusereg", type=Path, default=None, help="a checkout of YutaZhuo/DiffuseReg")
    ap.add_argument("--ldm-morph", type=Path, default=None, help="a checkout of wujiong-hub/LDM-Morph")
    ap.add_argument("--size", type=int, nargs=3, default=[16, 64, 64],
                    help="CorrMLP and FlowReg volume (D H W), divisible by 8")
    ap.add_argument("--diffusereg-size", type=int, nargs=3, default=[32, 64, 64],
                    help="DiffuseReg volume (D H W): multiples of 32, H and W at least 64 for the official code")
    ap.add_argument("--diffusereg-feature-size", type=int, default=120,
                    help="feature size of both DiffuseReg denoisers (120: the paper's; a multiple of 12)")
    ap.add_argument("--ldm-morph-size", type=int, nargs=2, default=[128, 128],
                    help="LDM-Morph image size (H W), multiples of 32")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    a = ap.parse_args()
    if not (a.flowreg or a.diffusereg or a.ldm_morph):
        ap.error("give at least one official checkout: --flowreg, --diffusereg or --ldm-morph")
    torch.set_num_threads(a.threads)
    sizes = {"corrmlp": a.size, "flowreg": a.size, "diffusereg": a.diffusereg_size, "ldm-morph": a.ldm_morph_size}
    rows, profiles, notes, repos, options = [], [], [], {}, []
    for option, flag in (("flowreg", "--flowreg PATH"), ("diffusereg", "--diffusereg PATH"),
                         ("ldm_morph", "--ldm-morph PATH")):
        if getattr(a, option):
            options.append(flag)
    if a.flowreg:
        options.append(f"--size {' '.join(map(str, a.size))}")
    if a.diffusereg:
        options.append(f"--diffusereg-size {' '.join(map(str, a.diffusereg_size))} "
                       f"--diffusereg-feature-size {a.diffusereg_feature_size}")
    if a.ldm_morph:
        options.append(f"--ldm-morph-size {' '.join(map(str, a.ldm_morph_size))}")
    for method, (_, option, repo) in OFFICIAL.items():
        path = getattr(a, option)
        if path is None:
            continue
        path = path.resolve()
        repos.setdefault(repo, _commit(path))
        size = sizes[method]
        times, ((p_ours, dead_ours), (p_theirs, dead_theirs)), (ours, theirs, fixed, moving) = time_pair(
            method, path, size, a.steps, a.batch, a)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["diffreg"] / med["official"]
        rows.append(f"| {method} | {' x '.join(map(str, size))} | {p_ours:,} | {p_theirs:,} | "
                    f"{dead_ours:,} / {dead_theirs:,} | {med['diffreg']:.3f} | {med['official']:.3f} | "
                    f"{ratio:.2f} |")
        print(rows[-1], flush=True)
        if method in NOTES:
            notes.append(NOTES[method])
        if ratio > 1.0:
            profiles.append(f"### {method}: diffreg\n\n```\n{profile(ours, fixed, moving)}\n```\n\n"
                            f"### {method}: official\n\n```\n{profile(theirs, fixed, moving)}\n```\n")
        del ours, theirs, fixed, moving
    cpu = platform.processor() or platform.machine()
    widths = ("Paper widths" if not a.diffusereg or a.diffusereg_feature_size == 120 else
              f"Paper widths except DiffuseReg's feature size ({a.diffusereg_feature_size} in both instead of 120)")
    text = (f"# One training step against the official code\n\n"
            f"`python benchmarks/speed_vs_official.py {' '.join(options)} --steps {a.steps} --batch {a.batch} "
            f"--threads {a.threads}` with " + ", ".join(f"`{r}` at commit {c}" for r, c in repos.items()) +
            f"; recorded {datetime.date.today().isoformat()} on {cpu} ({a.threads} thread), torch "
            f"{torch.__version__}. {widths}, batch {a.batch}; the median of {a.steps} steps of each, "
            "alternating, after two warm-up steps; ratio = diffreg / official (above 1: diffreg is slower). "
            "\"No gradient\": parameters that receive no gradient in the step (dead weights).\n\n"
            "| model | input | parameters (diffreg) | parameters (official) | no gradient (diffreg / official) | "
            "diffreg s/step | official s/step | ratio |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    text += ("\n" + ("No ratio is above 1.0, so no profile was needed." if not profiles else
                     "Where a ratio is above 1.0, the profiles of both steps are below.") + "\n")
    if notes:
        text += "\n" + "\n\n".join(notes) + "\n"
    if profiles:
        text += "\n## Profiles of the steps where diffreg is slower\n\n" + "\n".join(profiles)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
