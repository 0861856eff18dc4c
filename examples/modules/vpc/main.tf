# A stand-in VPC: null resources with the shape of the real thing, so the
# platform can be exercised with real Terraform and no cloud account.
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

variable "name" {
  type        = string
  description = "Name of the VPC"
}

variable "cidr_block" {
  type        = string
  default     = "10.0.0.0/16"
  description = "Address range of the VPC"
}

variable "private_subnet_count" {
  type        = number
  default     = 2
  description = "How many private subnets to create"
}

resource "null_resource" "vpc" {
  triggers = {
    name       = var.name
    cidr_block = var.cidr_block
  }
}

resource "null_resource" "private_subnet" {
  count = var.private_subnet_count
  triggers = {
    vpc   = null_resource.vpc.id
    index = tostring(count.index)
  }
}

output "vpc_id" {
  description = "The ID of the VPC"
  value       = "vpc-${null_resource.vpc.id}"
}

output "private_subnet_ids" {
  description = "List of private subnet IDs"
  value       = [for s in null_resource.private_subnet : "subnet-${s.id}"]
}
