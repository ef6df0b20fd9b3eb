"""convae: hierarchical image features without labels, from convolutional autoencoders."""
from ._version import __version__
