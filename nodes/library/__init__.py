"""The node library: data, normalizer, selector, RX, PCA, heads, loss and metric nodes, presets."""
