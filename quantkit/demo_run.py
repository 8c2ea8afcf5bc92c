"""The demo text: calibration and validation data of the shipped recipes (``data: default``).

``quantkit demo`` itself runs the shipped recipe ``demo`` (recipes/demo.yaml) through
quantkit/pipeline/; see quantkit/cli/recipes.py.
"""

from __future__ import annotations

# A short neutral text (written for quantkit), ~110 tokens with SmolLM2's tokenizer.
DEMO_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. "
    "In spring the water rises, and the children watch the boats drift slowly toward the sea. "
    "Every morning the baker opens his shop at six, and the smell of fresh bread fills the "
    "street. Farmers bring vegetables to the market square, where people meet to talk about "
    "the weather, the harvest and the news from the city. In the evening the lamps are lit one "
    "by one, and the bells of the church ring as the sun goes down behind the hills."
)
