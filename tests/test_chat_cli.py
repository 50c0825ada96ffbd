"""`dsv4 chat` on the tiny CPU artifact: turns stream their answers, the next turn is prefilled from the caches,
/reset starts afresh."""
import re

import pytest
from click.testing import CliRunner

from dsv4.cli import cli

pytestmark = pytest.mark.slow            # the tiny artifact's build (conftest `built`)


def test_a_terminal_chat_keeps_its_conversation_in_the_caches(built):
    out = built[0]
    result = CliRunner().invoke(cli, ["chat", str(out), "--max-new", "6", "--system", "Be brief."],
                                input="Hello\n\nMore please\n/reset\nHello\n/bye\nnever read\n")
    assert result.exit_code == 0, result.output
    cached = [int(n) for n in re.findall(r"\((\d+) prompt tokens cached\)", result.stderr)]
    assert len(cached) == 3 and cached[0] == 0 and cached[1] > 0 and cached[2] == 0
    answers = result.stdout.split(">>> ")[1:]
    assert len(answers) == 6                       # 3 answers, the blank line, /reset and /bye (no answer)
    assert answers[0] == answers[4] and answers[0].strip()   # greedy: the same first answer after /reset
