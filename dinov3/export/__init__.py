"""Exports of a DINOv3 backbone to where it is deployed or fine-tuned: ONNX, Hugging Face, timm, safetensors.

``dinov3.models.from_pretrained`` reads every weights format back; the ONNX graph is checked with onnxruntime
(``check_onnx``). The console script is ``dinov3-export`` (``dinov3/cli/export.py``).
"""

from .files import export_hf, export_safetensors, export_timm, model_kwargs_of
from .onnx import OPSET, OnnxCheck, check_onnx, export_onnx

__all__ = ["OPSET", "OnnxCheck", "check_onnx", "export_hf", "export_onnx", "export_safetensors", "export_timm",
           "model_kwargs_of"]
