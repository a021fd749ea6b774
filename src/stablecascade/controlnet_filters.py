"""Control inputs for the Stage C ControlNets (the official `modules/controlnet.py` filters and `notebooks/controlnet.ipynb`).

Images are float tensors in [0, 1], (B,3,H,W). Each filter returns the ControlNet's input for that kind:

| kind      | function                                  | channels | size            |
|-----------|-------------------------------------------|----------|-----------------|
| canny     | `canny_control`                           | 1        | H×W             |
| inpaint   | `inpaint_control` / `outpaint_control`    | 4        | H×W (padded)    |
| sr        | `sr_control` / `sr_upscale_control`       | 16       | latent grid ×2  |
| identity  | `FaceIdentityFilter` / `face_identity_control` | 512 | H/32×W/32       |

Canny uses OpenCV (the optional `canny` extra; it reproduces the official filter exactly). Face identity needs the optional
`insightface` + `onnxruntime` and the buffalo_l ONNX files; missing ones raise `InputError` naming what to install.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError

if TYPE_CHECKING:
    import PIL.Image

CONTROL_CHANNELS = {"canny": 1, "inpaint": 4, "sr": 16, "identity": 512}

CANNY_RESIZE = 224
CANNY_THRESHOLDS = (100, 200)
SALIENCY_SIZE = 240  # shorter side the saliency net sees
SALIENCY_THRESHOLD = 0.2  # the notebook's value (training draws U(0.04, 0.4))
MASK_BLUR_KERNEL = 141
MASK_BLUR_SIGMA = 0.3 * ((MASK_BLUR_KERNEL - 1) * 0.5 - 1) + 0.8  # torchvision's default for 141: 21.5
FACE_GRID = 32  # the identity map has one cell per 32x32 pixels
FACE_MODEL_FILES = ("det_10g.onnx", "w600k_r50.onnx")  # insightface "buffalo_l" detector and ArcFace recogniser


def _as_batch(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputError(f"{name} must be a float tensor in [0, 1] of shape (B,3,H,W)")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{name} must have shape (B,3,H,W) or (3,H,W), got {tuple(images.shape)}")
    return images


# ------------------------------------------------------------------------------------------------------ canny
def canny_control(images: torch.Tensor, low_threshold: int = CANNY_THRESHOLDS[0],
                  high_threshold: int = CANNY_THRESHOLDS[1], resize: Optional[int] = CANNY_RESIZE) -> torch.Tensor:
    """Edge map (B,1,H,W) in [0, 1] as the canny ControlNet was trained on: bilinear resize to resize×resize (aspect
    not kept), OpenCV's Canny on the uint8 RGB image with thresholds 100/200, bilinear resize back."""
    try:
        import cv2
    except ImportError:
        raise InputError("the canny filter needs OpenCV: pip install 'stablecascade[canny]' (or any of "
                         "opencv-python-headless, opencv-python)") from None

    images = _as_batch(images)
    size = images.shape[-2:]
    x = images.detach().float().cpu()
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    pixels = (x.clamp(0, 1) * 255).to(torch.uint8)  # truncation, as the official `astype(np.uint8)`
    edges = torch.stack([
        torch.from_numpy(cv2.Canny(np.ascontiguousarray(p.permute(1, 2, 0).numpy()), low_threshold, high_threshold))
        for p in pixels
    ])[:, None].float().div(255)
    if resize is not None:
        edges = F.interpolate(edges, size=size, mode="bilinear", align_corners=False)
    return edges.to(images.device)


# ---------------------------------------------------------------------------------------------- masks, inpaint
MaskInput = Union[torch.Tensor, np.ndarray, "PIL.Image.Image"]


def prepare_mask(mask: MaskInput, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """A user mask (PIL image, array or tensor; 1/white = area to generate) as a float (batch,1,height,width)
    tensor of 0s and 1s: resized with nearest neighbours, then binarised at 0.5."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with torchvision
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))  # a writable copy
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a PIL image, a numpy array or a tensor, not {type(mask).__name__}")
    if mask.dtype == torch.bool:
        m = mask.float()
    elif mask.dtype == torch.uint8:
        m = mask.float() / 255
    elif mask.is_floating_point():
        m = mask.float()
    else:
        raise InputError(f"mask has dtype {mask.dtype}; use bool, uint8 (0..255) or float (0..1)")
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    elif m.dim() != 4:
        raise InputError(f"mask must be (H,W), (N,H,W) or (N,C,H,W), got shape {tuple(mask.shape)}")
    if m.shape[1] != 1:
        m = m.mean(dim=1, keepdim=True)
    if m.shape[0] not in (1, batch):
        raise InputError(f"mask holds {m.shape[0]} masks for {batch} images; give one mask or one per image")
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="nearest-exact")
    return (m > 0.5).float().expand(batch, -1, -1, -1).contiguous()


def inpaint_control(images: torch.Tensor, mask: Optional[MaskInput] = None, *,
                    saliency: Union[None, str, Path, "MicroResNet"] = None, threshold: float = SALIENCY_THRESHOLD,
                    outpaint: bool = False) -> torch.Tensor:
    """The inpainting ControlNet's input (B,4,H,W): the image with the masked pixels set to 1.0 (white), then the mask
    (1 = area to generate). Without a mask, the official saliency net (its weights as `saliency`, a safetensors path
    or a loaded `MicroResNet`) masks the salient object, or everything else with `outpaint=True`."""
    images = _as_batch(images)
    b, _, h, w = images.shape
    if mask is not None:
        m = prepare_mask(mask, h, w, b).to(images.device)
    elif saliency is not None:
        model = saliency if isinstance(saliency, nn.Module) else load_saliency_model(saliency, device=images.device)
        m = saliency_mask(images, model, threshold=threshold, invert=outpaint)
    else:
        raise InputError("inpainting needs a mask (white = area to generate), or the saliency model's weights "
                         "(saliency=path to a safetensors conversion of the official "
                         "modules/cnet_modules/inpainting/saliency_model.pt) to find one automatically")
    m = m.to(images.dtype)
    masked = torch.where(m > 0.5, torch.ones_like(images), images)
    return torch.cat([masked, m], dim=1)


def _pad_amounts(pad) -> tuple[int, int, int, int]:
    if isinstance(pad, int):
        pad = (pad,) * 4
    pad = tuple(pad)
    if len(pad) == 2:  # (horizontal, vertical)
        pad = (pad[0], pad[1], pad[0], pad[1])
    if len(pad) != 4 or any(not isinstance(p, int) or p < 0 for p in pad):
        raise InputError(f"pad must be a non-negative int, (x, y) or (left, top, right, bottom) pixels, got {pad!r}")
    return pad


def pad_for_outpaint(images: torch.Tensor, pad, fill: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded images, mask of the new area) for outpainting; `pad` = int, (x, y) or (left, top, right, bottom)."""
    images = _as_batch(images)
    left, top, right, bottom = _pad_amounts(pad)
    padded = F.pad(images, (left, right, top, bottom), value=fill)
    mask = torch.ones_like(padded[:, :1])
    mask[:, :, top:top + images.shape[-2], left:left + images.shape[-1]] = 0
    return padded, mask


def outpaint_control(images: torch.Tensor, pad) -> torch.Tensor:
    """The inpainting ControlNet's input for extending the images by `pad` pixels (see `pad_for_outpaint`)."""
    padded, mask = pad_for_outpaint(images, pad)
    return inpaint_control(padded, mask)


# ----------------------------------------------------------------------------------------- saliency (MicroResNet)
def _conv_in_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel, stride=stride),
            nn.InstanceNorm2d(c_out, affine=True), nn.ReLU()]


class SaliencyResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        layers = _conv_in_relu(c, c, 3) + _conv_in_relu(c, c, 3)[:-1]  # no ReLU after the second norm
        self.resblock = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.resblock(x)


class MicroResNet(nn.Module):
    """The official saliency net used to draw inpainting masks (1/16 resolution inside, 1/8 resolution sigmoid map
    out). Parameter names follow the official `saliency_model.pt`."""

    def __init__(self):
        super().__init__()
        self.downsampler = nn.Sequential(*_conv_in_relu(3, 8, 9, 4), *_conv_in_relu(8, 16, 3, 2),
                                         *_conv_in_relu(16, 32, 3, 2))
        self.residual = nn.Sequential(SaliencyResBlock(32), nn.Conv2d(32, 64, 1, bias=False, groups=32),
                                      SaliencyResBlock(64))
        self.segmentator = nn.Sequential(*_conv_in_relu(64, 16, 3), nn.Upsample(scale_factor=2, mode="nearest"),
                                         nn.ReflectionPad2d(4), nn.Conv2d(16, 1, 9), nn.Sigmoid())

    def forward(self, x):
        return self.segmentator(self.residual(self.downsampler(x)))


def load_saliency_model(path: Union[str, Path], device="cpu") -> MicroResNet:
    """The saliency net from a safetensors file (a conversion of the official pickle `saliency_model.pt`)."""
    from .checkpoints import read_state_dict

    state, _ = read_state_dict(path, torch.float32)
    model = MicroResNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path} is not the inpainting saliency model (MicroResNet): {first}") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def saliency_mask(images: torch.Tensor, model: MicroResNet, threshold: float = SALIENCY_THRESHOLD,
                  invert: bool = False) -> torch.Tensor:
    """Official automatic mask (B,1,H,W): saliency at 240 px shorter side > threshold (inverted for outpainting),
    nearest-upsampled, Gaussian-blurred (kernel 141, sigma 21.5) and re-thresholded at 0.5 to smooth it."""
    from torchvision.transforms.functional import gaussian_blur, resize

    images = _as_batch(images)
    h, w = images.shape[-2:]
    param = next(model.parameters())
    small = resize(images.to(param), SALIENCY_SIZE, antialias=True)
    salient = model(small).float() > threshold
    if invert:
        salient = ~salient
    m = F.interpolate(salient.float(), size=(h, w), mode="nearest")
    kernel = min(MASK_BLUR_KERNEL, 2 * min(h, w) - 1)  # reflect padding must stay inside small images
    m = gaussian_blur(m, [kernel, kernel], [MASK_BLUR_SIGMA, MASK_BLUR_SIGMA]) > 0.5
    return m.float().to(images.device)


# ------------------------------------------------------------------------------------------- super-resolution
@torch.no_grad()
def sr_control(effnet: nn.Module, images: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """The official SR filter (training form): nearest-downscale by `scale_factor`, EfficientNet-encode,
    nearest-upscale the 16-channel latent back by 1/scale_factor. The control then describes the image at its own
    size from a half-resolution copy; for upscaling an image use `sr_upscale_control`."""
    images = _as_batch(images)
    param = next(effnet.parameters())
    small = F.interpolate(images, scale_factor=scale_factor, mode="nearest")
    latent = effnet(small.to(param))
    return F.interpolate(latent.float(), scale_factor=1 / scale_factor, mode="nearest")


@torch.no_grad()
def sr_upscale_control(effnet: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Control for a 2x upscale of `images` (the notebook's form): effnet latents (ceil(H/32) x ceil(W/32)) nearest-
    upsampled x2. Equal to `sr_control` of the images nearest-upsampled x2. Sample Stage C at the control's size and
    Stage B at `sr_output_size(H, W)`."""
    images = _as_batch(images)
    param = next(effnet.parameters())
    return F.interpolate(effnet(images.to(param)).float(), scale_factor=2, mode="nearest")


def sr_output_size(height: int, width: int, scale: float = 2.0) -> tuple[int, int]:
    """Output (height, width) of a super-resolution run: `scale` x the input, rounded to the nearest multiple of 8 so
    the Stage B latent (size / 4) is always even. The official `control size x 32 x 4/3` rule can give odd Stage B
    latents (1024 px -> 2730 px -> 683), which Stage B's PixelUnshuffle(2) rejects."""
    if height <= 0 or width <= 0 or scale <= 0:
        raise InputError(f"sizes and scale must be positive, got {height}x{width} scale {scale}")
    return tuple(max(8, int(math.floor(v * scale / 8 + 0.5)) * 8) for v in (height, width))


# ----------------------------------------------------------------------------------------------- face identity
def paint_identity_map(boxes: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], height: int,
                       width: int) -> torch.Tensor:
    """(B,512,height//32,width//32) map holding each face's L2-normalised identity vector over its box.

    boxes[i]: (N_i,4) pixel boxes (x0, y0, x1, y1) of image i; ids[i]: (N_i,512). Box corners are truncated to
    integer pixels, divided by 32 and rounded; each face covers at least one cell. Later faces overwrite earlier
    ones where boxes overlap."""
    gh, gw = height // FACE_GRID, width // FACE_GRID
    if gh == 0 or gw == 0:
        raise InputError(f"the identity filter needs images of at least {FACE_GRID}x{FACE_GRID} pixels")
    dim = next((v.shape[-1] for v in ids if len(v)), 512)
    out = torch.zeros(len(boxes), dim, gh, gw)
    for i, (bx, vecs) in enumerate(zip(boxes, ids)):
        vecs = torch.as_tensor(vecs, dtype=torch.float32)
        vecs = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cells = (torch.as_tensor(bx, dtype=torch.float32).trunc() / FACE_GRID).clamp(min=0).round().long()
        for (sx, sy, ex, ey), v in zip(cells.tolist(), vecs):
            sx, sy = min(sx, gw - 1), min(sy, gh - 1)  # a face on the border keeps at least its edge cell
            ex, ey = max(ex, sx + 1), max(ey, sy + 1)
            out[i, :, sy:ey, sx:ex] = v[:, None, None]
    return out


def _require_insightface() -> None:
    missing = [name for name in ("insightface", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"the face-identity filter needs {' and '.join(missing)} (pip install insightface onnxruntime) and the "
            f"insightface 'buffalo_l' models {FACE_MODEL_FILES[0]} and {FACE_MODEL_FILES[1]} in a folder you pass "
            "as model_dir (insightface downloads them to ~/.insightface/models/buffalo_l)")


class FaceIdentityFilter:
    """ArcFace identities of up to `max_faces` faces per image, painted into a (B,512,H/32,W/32) map (the identity
    ControlNet's input). Needs insightface + onnxruntime and a folder holding det_10g.onnx and w600k_r50.onnx."""

    def __init__(self, model_dir: Union[str, Path], max_faces: int = 4, det_size: int = 320,
                 det_threshold: float = 0.5, providers: Optional[Sequence[str]] = None):
        _require_insightface()
        model_dir = Path(model_dir)
        missing = [f for f in FACE_MODEL_FILES if not (model_dir / f).is_file()]
        if missing:
            raise InputError(f"{model_dir} lacks {', '.join(missing)}: download insightface's 'buffalo_l' model pack "
                             "and pass the folder holding its ONNX files as model_dir")
        from insightface.model_zoo import get_model

        providers = list(providers or ["CPUExecutionProvider"])
        self.max_faces = max_faces
        self.detector = get_model(str(model_dir / FACE_MODEL_FILES[0]), providers=providers)
        self.detector.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=det_threshold, nms_thresh=0.4)
        self.recognizer = get_model(str(model_dir / FACE_MODEL_FILES[1]), providers=providers)
        self.recognizer.prepare(ctx_id=-1)

    def faces(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (N,4), identities (N,512)) of one (3,H,W) image in [0, 1]."""
        from insightface.app.common import Face

        rgb = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        boxes, kps = self.detector.detect(bgr, max_num=self.max_faces)
        ids = torch.zeros(len(boxes), 512)
        for i in range(len(boxes)):
            face = Face(bbox=boxes[i, :4], kps=kps[i], det_score=boxes[i, 4])
            ids[i] = torch.from_numpy(np.asarray(self.recognizer.get(bgr, face), dtype=np.float32).reshape(-1))
        return torch.from_numpy(np.asarray(boxes[:, :4], dtype=np.float32)).reshape(-1, 4), ids

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _as_batch(images)
        found = [self.faces(img) for img in images]
        out = paint_identity_map([f[0] for f in found], [f[1] for f in found], *images.shape[-2:])
        return out.to(images.device)


def face_identity_control(images: torch.Tensor, model_dir: Union[str, Path], max_faces: int = 4) -> torch.Tensor:
    """One-off `FaceIdentityFilter(model_dir, max_faces)(images)`; keep a filter object to reuse the models."""
    _require_insightface()
    return FaceIdentityFilter(model_dir, max_faces=max_faces)(images)
