"""The balancing methods, one private module per method (paper, equations, state).

Nothing here is public API: each method is reached as ``lossbalance.<Name>``, through
``lossbalance.create(name, K)``, or as a function in :mod:`lossbalance.functional`.
``_vector`` holds the base class of the methods that need the per-term gradient vectors and
not only their Gramian; ``_blas`` the one-thread BLAS wrapper of the small K x K solves.
"""
