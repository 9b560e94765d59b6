# temporary: replaced by the move of opsd/grading.py
from opsd.grading import *  # noqa
from opsd.grading import Grader, extract_answer  # noqa
