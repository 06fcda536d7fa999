"""Datasets: on-device toy 2D distributions (:mod:`diffjax.data.toy2d`) and the grain pipeline of
image datasets and npz arrays of any example shape (:mod:`diffjax.data.images`).

Import the submodule you need, e.g. ``from diffjax.data import toy2d``; nothing is imported here
so that loading the toy samplers never pulls in the image pipeline's dependencies.
"""
