"""Encoders and decoders: plain nn.Modules built from the data's image shape at build time."""

from vaelab.nets.decoders import ConvDecoder, MLPDecoder
from vaelab.nets.encoders import ConvEncoder, GatedDense, MLPEncoder
from vaelab.nets.resnet import ResNetDecoder, ResNetEncoder

__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "GatedDense",
    "MLPDecoder",
    "MLPEncoder",
    "ResNetDecoder",
    "ResNetEncoder",
]
