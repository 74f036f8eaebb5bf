"""The code MLflow logs as the `classifier` model (models from code), so loading it unpickles nothing."""

from mlflow.models import set_model

from pipeline.serving.pyfunc import DigitClassifier

set_model(DigitClassifier())
