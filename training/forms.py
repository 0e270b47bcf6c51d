from django import forms


class PlaygroundForm(forms.Form):
    model = forms.ChoiceField(help_text="A community model; the playground samples from its current version.")
    prompt = forms.CharField(max_length=500, required=False, strip=False, widget=forms.Textarea(attrs={"rows": 3}),
                             help_text="Text the model continues (bytes; up to 500 characters).")
    max_new_tokens = forms.IntegerField(min_value=1, max_value=400, initial=200, label="Length",
                                        help_text="Bytes to generate (1–400).")
    temperature = forms.FloatField(min_value=0.0, max_value=2.0, initial=0.8,
                                   help_text="0 is greedy; higher is more surprising (0–2).")
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, initial=0, help_text="Same seed, same text.")

    def __init__(self, *args, models=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(m.slug, m.name or m.slug) for m in models]


class RunCancelForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}), max_length=2000,
        help_text="Required. Published in the ledger; the run stops and its open tasks expire.",
    )
