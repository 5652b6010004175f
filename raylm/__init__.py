"""raylm: build a language model from scratch on a Ray cluster.

Stages: curate (Ray Data) -> tokenize -> pretrain (Ray Train) -> tune (Ray Tune) -> finetune -> eval
(lm-eval on evaluation actors), every one tracked in MLflow. See DESIGN in the README.
"""

__version__ = "0.1.0"
