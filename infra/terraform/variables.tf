variable "project" {
  type        = string
  description = "Google Cloud project id."
}

variable "region" {
  type    = string
  default = "us-central1"
}

variable "service" {
  type    = string
  default = "jaxchat"
}

variable "image" {
  type        = string
  description = "Container image built by cloudbuild.yaml."
}

variable "model_name" {
  type    = string
  default = "smollm2-135m-instruct"
}

variable "model_aliases" {
  description = "Other names clients may use for the model (JAXCHAT_MODEL_ALIASES)."
  type        = list(string)
  default     = []
}

variable "model_uri" {
  type        = string
  default     = ""
  description = "JAXCHAT_MODEL; empty serves the model bundled in the image."
}

variable "min_instances" {
  type    = number
  default = 0
}

variable "max_instances" {
  type    = number
  default = 4
}
