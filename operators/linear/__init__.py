"""Linear attention: chunked fast path; `naive.linear_attention` is the recurrent reference."""

from streamctx.operators.linear.attention import DEFAULT_CHUNK, LinearState, linear_attention
from streamctx.operators.linear.feature_maps import FeatureMap, apply_feature_map, random_projection

__all__ = ["linear_attention", "LinearState", "DEFAULT_CHUNK", "FeatureMap", "apply_feature_map",
           "random_projection"]
