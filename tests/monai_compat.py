"""Import monai-generative 0.2.3 next to MONAI 1.6.1.

monai-generative's `generative.utils` (which its schedulers and inferers import) still takes `IgniteInfo` from
`monai.config`, where MONAI 1.6 no longer re-exports it; the class itself is unchanged. Import this module before
anything from `generative`.
"""
import monai.config
from monai.utils.enums import IgniteInfo

if not hasattr(monai.config, "IgniteInfo"):
    monai.config.IgniteInfo = IgniteInfo
