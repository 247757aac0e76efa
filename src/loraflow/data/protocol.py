"""The paper's evaluation protocol as text: the authors' system prompts (one table), the official
math and code prompts, and the stop strings generation is cut at.

Pure Python: read by data formatting, generation, scoring and serving alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraflow.common.errors import LoraFlowError

# The six system prompts of the protocol (= ../shared/loraflow-data/system_prompts.json), keyed
# "{lang}_{task}". The code ones are also the instructions of the translated-HumanEval prompts.
OFFICIAL_SYSTEM_PROMPTS: dict[str, str] = {
    "zh_math": "你是中文人工智能助手，你的职责是帮助用户解决他们的问题。回答问题时，为了让中文用户更好地理解你的回答，"
    "你只能使用中文作答。答案尽量具有较高帮助性、可读性，并且不要输出有害内容。请注意一定不要使用英文作答。",
    "zh_code": "为这个问题创建一个Python脚本",
    "ru_math": "Ты являешься русским ассистентом искусственного интеллекта, твоя ответственность помогать "
    "пользователям решать их проблемы. При отвечании на вопросы, для того, чтобы русскоязычные пользователи "
    "лучше понимали твои ответы, ты можешь использовать только русский язык. Старайся, чтобы твои ответы были "
    "максимально полезными и читаемыми, и не допускай публикации вредоносного контента. Пожалуйста, не используй "
    "английский язык для ответа.",
    "ru_code": "Создайте Python скрипт для этой задачи.",
    "es_math": "Eres un asistente de inteligencia artificial en español, y tu responsabilidad es ayudar a los "
    "usuarios a resolver sus problemas. Cuando respondas a las preguntas, para que los usuarios que hablan "
    "español puedan entender mejor tus respuestas, solo puedes usar español para contestar. Intenta que tus "
    "respuestas sean lo más útiles y comprensibles posible, y no envíes ningún contenido dañino. Por favor, "
    "no uses inglés para contestar.",
    "es_code": "Crear un script de Python para este problema",
}


def official_system_prompt(lang: str, task: str) -> str:
    """The paper's system prompt for a (language, task) pair, e.g. ("zh", "math").

    Raises:
        LoraFlowError: for a pair the protocol does not define (the message lists the known ones).
    """
    key = f"{lang}_{task}"
    if key not in OFFICIAL_SYSTEM_PROMPTS:
        known = ", ".join(sorted(OFFICIAL_SYSTEM_PROMPTS))
        raise LoraFlowError(f"no official system prompt for lang={lang!r}, task={task!r}; known: {known}")
    return OFFICIAL_SYSTEM_PROMPTS[key]


TASKS = ("math", "code")
MODES = ("official", "strict")
LANGUAGES = ("zh", "ru", "es")

# The instruction that precedes the translated HumanEval prompt, per language.
CODE_INSTRUCTIONS: dict[str, str] = {lang: OFFICIAL_SYSTEM_PROMPTS[f"{lang}_code"] for lang in LANGUAGES}

# Generation for math stops at any of these (the model's text is cut before the first one).
MATH_STOP_STRINGS: tuple[str, ...] = (
    "Question:", "USER:", "ASSISTANT:", "Instruction:", "Response:", "[INST]",
    "Question", "USER", "ASSISTANT", "Instruction", "Response",
)

MATH_MAX_NEW_TOKENS = 512
CODE_MAX_NEW_TOKENS = 512
CODE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise LoraFlowError(f"unknown language {language!r}; expected one of {', '.join(LANGUAGES)}")


def build_math_prompt(question: str, language: str, system: str | None = None) -> str:
    """The official MGSM prompt: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{question} [/INST]``.

    Args:
        question: the question in the target language.
        language: "zh", "ru" or "es"; selects the official system prompt.
        system: overrides the official system prompt.

    The tokenizer adds ``<s>``; this string does not contain it.
    """
    _check_language(language)
    if system is None:
        system = OFFICIAL_SYSTEM_PROMPTS[f"{language}_math"]
    return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question} [/INST]"


def build_code_prompt(prompt: str, language: str) -> str:
    """The official translated-HumanEval prompt: ``[INST]{instruction}:\\n{prompt}\\n\\n[/INST]``.

    The prompt is stripped and every run of 4 spaces becomes a tab, as the authors did.
    """
    _check_language(language)
    body = prompt.strip().replace("    ", "\t")
    return f"[INST]{CODE_INSTRUCTIONS[language]}:\n{body}\n\n[/INST]"


def truncate_at_stop(text: str, stop_strings: Sequence[str] = MATH_STOP_STRINGS) -> str:
    """Cut `text` before the earliest occurrence of any stop string (unchanged if there is none)."""
    cut = len(text)
    for stop in stop_strings:
        i = text.find(stop)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]
