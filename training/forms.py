from django import forms

from training.playground import MAX_NEW_TOKENS, MAX_PROMPT_CHARS


class PlaygroundForm(forms.Form):
    model = forms.ChoiceField(help_text="A community model.")
    version = forms.TypedChoiceField(coerce=int, required=False, empty_value=None,
                                     help_text="Which version to sample; the latest unless you choose.")
    prompt = forms.CharField(max_length=MAX_PROMPT_CHARS, required=False, strip=False,
                             widget=forms.Textarea(attrs={"rows": 3}),
                             help_text=f"Text the model continues (up to {MAX_PROMPT_CHARS} characters).")
    max_new_tokens = forms.IntegerField(min_value=1, max_value=MAX_NEW_TOKENS, initial=200, label="Max tokens",
                                        help_text=f"Tokens to generate (1–{MAX_NEW_TOKENS}); a byte-level "
                                                  "model's tokens are bytes.")
    temperature = forms.FloatField(min_value=0.0, max_value=2.0, initial=0.8,
                                   help_text="0 is greedy; higher is more surprising (0–2).")
    top_k = forms.IntegerField(min_value=1, max_value=100_000, initial=40, required=False, label="Top-k",
                               help_text="Sample among the k likeliest tokens (empty: all).")
    top_p = forms.FloatField(min_value=0.01, max_value=1.0, initial=1.0, required=False, label="Top-p",
                             help_text="Sample among the likeliest tokens whose probability adds up to p "
                                       "(0.01–1; 1: all).")
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0, help_text="Same seed, same text.")

    def __init__(self, *args, models=(), versions=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.slug, m.name or m.slug) for m in models]
        latest = versions[0].number if versions else None
        self.fields["version"].choices = [("", f"latest (v{latest})" if latest else "latest")] + [
            (v.number, f"v{v.number}" + (f" · run {v.run_id} round {v.round.index}" if v.run_id and v.round_id
                                          else (f" · {v.source}" if v.source else ""))) for v in versions]


class RunCancelForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}), max_length=2000,
        help_text="Required. Published in the ledger; the run stops and its open tasks expire.",
    )


class ModelImportForm(forms.Form):
    directory = forms.CharField(max_length=1000, help_text="A Hugging Face model directory under the data root "
                                "(config.json, model.safetensors, tokenizer.json), absolute or relative to it.")
    slug = forms.SlugField(max_length=64, help_text="The community model it becomes a version of (new or existing).")
    name = forms.CharField(max_length=120, required=False, help_text="A display name for a new model.")

    def __init__(self, *args, data_root, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_root = data_root

    def clean_directory(self):
        import os

        root = os.path.realpath(self.data_root)
        value = self.cleaned_data["directory"].strip()
        real = os.path.realpath(os.path.join(root, value))  # an absolute value replaces the root
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            raise forms.ValidationError(f"The directory must be under the data root {root}.")
        if not os.path.isdir(real):
            raise forms.ValidationError(f"There is no directory {value} under the data root.")
        return real
