"""Expert trajectories for trajectory matching (MTT, PTM): training the experts and storing their
parameters (:mod:`~histodistill.trajectories.buffer`), the lazy HDF5 store
(:mod:`~histodistill.trajectories.store`) and the student's memory-bounded unroll
(:mod:`~histodistill.trajectories.unroll`)."""
