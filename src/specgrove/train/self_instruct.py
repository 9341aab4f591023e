"""Requests the target writes itself, for training data beyond Spec-Bench's (`specgrove train-eagle --self-prompts`).

Spec-Bench's questions that may be trained on (translation, summarization, qa, rag) have short answers, and none
is an open request like those of its other categories (writing, coding, reasoning, ...), whose prompts come from
MT-bench's own release and are never used. So the target is asked to write a request on each of the topics below
(written for this project, taken from no evaluation set), and then answers its own requests: both the requests
and the answers are the target's text.
"""

from __future__ import annotations

TOPICS = (
    "writing a Python function that parses dates from log lines",
    "fixing an off-by-one error in a loop over a list",
    "explaining recursion with a small example",
    "writing a SQL query that joins orders and customers",
    "implementing a stack in JavaScript",
    "reading a CSV file with pandas and grouping rows",
    "writing a unit test with pytest",
    "the difference between a process and a thread",
    "a Go function that reverses a string",
    "a Rust struct with a constructor and a method",
    "sorting a list of dictionaries by a key",
    "a regular expression that matches e-mail addresses",
    "a bash script that renames files in a folder",
    "binary search and its complexity",
    "a C function that counts the bits set in an integer",
    "using git to undo the last commit",
    "a REST API endpoint in Flask",
    "memoization of an expensive function",
    "a class hierarchy for shapes with an area method",
    "converting a recursive function into a loop",
    "a short story about a lighthouse keeper",
    "a polite e-mail asking a colleague for a deadline extension",
    "a poem about autumn rain",
    "a product description for a reusable water bottle",
    "a speech for a friend's wedding",
    "a cover letter for a junior data analyst position",
    "a blog post about learning to cook at home",
    "a dialogue between a detective and a witness",
    "a review of a fictional science-fiction film",
    "an outline for an essay about city parks",
    "pretending to be a tour guide in an old harbour town",
    "pretending to be a chef explaining a new dish",
    "acting as a job interviewer for a software role",
    "playing a medieval innkeeper greeting a traveller",
    "a logic puzzle about four friends and their pets",
    "how many handshakes happen among ten people",
    "the probability of rolling two sixes with two dice",
    "comparing two phone plans with different prices per month",
    "solving a pair of linear equations",
    "the area of a circle inscribed in a square",
    "splitting a restaurant bill with a tip among five people",
    "compound interest on a savings account over ten years",
    "why the sky is blue",
    "how vaccines train the immune system",
    "what photosynthesis produces",
    "how a refrigerator moves heat",
    "the water cycle",
    "Newton's three laws of motion with everyday examples",
    "what DNA replication is",
    "how batteries store energy",
    "the causes of the French Revolution",
    "the importance of the printing press",
    "the difference between weather and climate",
    "what inflation is and why prices rise",
    "supply and demand with an example",
    "the main ideas of stoicism",
    "how a bill becomes a law in a parliament",
    "the history of the bicycle",
    "planning a three-day trip to a mountain region",
    "a weekly meal plan for a vegetarian",
    "tips for sleeping better",
    "how to prepare for a job interview",
    "a beginner's workout routine at home",
    "how to keep houseplants alive",
    "saving money on groceries",
    "learning a new language as an adult",
    "extracting the names and dates from a short paragraph of meeting notes",
    "turning a list of tasks into a table with owners and deadlines",
    "summarizing the key points of a paragraph about remote work",
    "classifying customer comments as positive or negative",
    "rewriting a sentence in a more formal tone",
    "translating a short greeting into Spanish and French",
    "explaining a JSON document's structure",
    "designing a database schema for a library",
    "estimating the time complexity of nested loops",
    "the pros and cons of electric cars",
    "how search engines rank pages",
    "what a neural network is, in simple words",
    "how to write a good commit message",
    "explaining the Pythagorean theorem",
)
STYLES = (
    "Write one request that a user might send to an AI assistant about {topic}. Reply with the request only.",
    "Write a detailed task, as a user would type it to an AI assistant, about {topic}. Reply with the task only.",
)


def instruction_texts(num: int) -> list[str]:
    """The first `num` instructions that ask the target for a request (topics x styles, topics first)."""
    texts = [style.format(topic=topic) for style in STYLES for topic in TOPICS]
    if num > len(texts):
        raise ValueError(f"there are {len(texts)} self-instruct topics and styles; ask for at most that many")
    return texts[:num]


def chat_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text as a user turn through the target's chat template."""
    from specgrove.bench.questions import encode_questions

    return [p.token_ids for p in encode_questions([{"category": "self", "turns": [t]} for t in texts], tokenizer)]
