"""Train tasks: :class:`LandmarkTrainTask` (:mod:`lib.trainers.task`) fine-tunes or retrains every detector."""

from lib.trainers.task import INIT_CHOICES, REPORT_FILE, STATS_FILE, LandmarkTrainTask, TrainOptions

__all__ = ["INIT_CHOICES", "REPORT_FILE", "STATS_FILE", "LandmarkTrainTask", "TrainOptions"]
