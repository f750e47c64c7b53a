"""precision-pipeline: train at a chosen precision, quantize, export, evaluate, serve, report."""
