"""The graph: typed ports, the node base class, the pipeline that wires nodes, the node registry."""
