"""emanet: Expectation-Maximization Attention Networks for semantic segmentation."""

__version__ = "0.1.0"
