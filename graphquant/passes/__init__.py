"""Graph passes, each ``GraphModule -> GraphModule``: fold_bn, annotate, insert_observers, lower."""
