"""Deployment: Predictor and the `emanet predict` file loop, ONNX export, attention maps, the Hugging Face
Hub and model cards."""
