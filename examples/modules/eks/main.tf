terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

variable "cluster_name" {
  type        = string
  description = "Name of the EKS cluster"
}

variable "vpc_id" {
  type        = string
  description = "VPC the cluster runs in"
}

variable "subnet_ids" {
  type        = list(string)
  description = "Subnets of the worker nodes"
}

variable "kubernetes_version" {
  type    = string
  default = "1.29"
}

variable "node_count" {
  type    = number
  default = 2
}

resource "null_resource" "cluster" {
  triggers = {
    name       = var.cluster_name
    vpc_id     = var.vpc_id
    subnet_ids = join(",", var.subnet_ids)
    version    = var.kubernetes_version
    nodes      = tostring(var.node_count)
  }
}

output "cluster_id" {
  value = "eks-${null_resource.cluster.id}"
}

output "cluster_endpoint" {
  value = "https://${var.cluster_name}.eks.example.internal"
}
