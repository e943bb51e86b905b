"""Wire formats and sockets between robots and the policy server. No JAX here: robots install it cheaply."""
