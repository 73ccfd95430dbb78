"""Graph passes, each a function of a GraphModule: find blocks and chains, classify, split, rewrite."""
