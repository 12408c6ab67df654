"""The paper's three studies, one module each, each run by one config dataclass:
``gradient_flow`` (init), ``dst`` (dynamic sparse training), ``lottery`` (lottery tickets).
Results go to ``<out>/<study>/<config hash>/``: config.json, results.json, PNG plots, summary.md."""
from . import dst, gradient_flow, lottery
from .dst import DSTConfig
from .gradient_flow import GradientFlowConfig
from .lottery import LotteryConfig

STUDIES = {"gradient-flow": (gradient_flow, GradientFlowConfig), "dst": (dst, DSTConfig),
           "lottery": (lottery, LotteryConfig)}

__all__ = ["STUDIES", "GradientFlowConfig", "DSTConfig", "LotteryConfig", "gradient_flow", "dst", "lottery"]
