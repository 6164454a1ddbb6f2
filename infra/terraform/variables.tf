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

variable "keys_file" {
  type        = string
  default     = ""
  description = "JAXCHAT_KEYS_FILE: a TOML file of client keys and their limits, e.g. gs://BUCKET/keys.toml (the service account reads the weights bucket); empty: no keys file."
}

variable "response_cache_ttl" {
  type        = number
  default     = 0
  description = "JAXCHAT_RESPONSE_CACHE_TTL: seconds a reply to a deterministic request is kept; 0 disables the cache."
}

variable "memorystore" {
  type        = bool
  default     = false
  description = "Share rate limits, budgets and the response cache between instances through a Memorystore for Redis instance (JAXCHAT_STATE_URL). Without it each instance keeps its own."
}

variable "memorystore_size_gb" {
  type    = number
  default = 1
}

variable "network" {
  type        = string
  default     = "default"
  description = "VPC network (and subnetwork of the same name in the region) through which Cloud Run reaches Memorystore."
}

variable "managed_prometheus" {
  type        = bool
  default     = true
  description = "Run the Managed Service for Prometheus collector beside the server, so /metrics reaches Cloud Monitoring."
}
